//! A strided matrix transpose shared by the hot loops that turn a matrix around before `gemm`
//! or a register-blocked loop reads it (`sparse_input`'s weight blocks, `ops::winograd`'s
//! weight-gradient factors).

use super::Build;

/// `dst[c * ds + r] = src[r * ss + c]` for `r < rows`, `c < cols`: 8 x 8 tiles in AVX registers
/// in the AVX2 build, the edges element by element (a strided scalar copy was ~40% of the sparse
/// path's time, `sparse_input`; `gemm` packing a Winograd weight gradient's factors one value at
/// a time was a third of those products' time, `ops::winograd`). A plain copy, so the result is
/// the same either way.
pub(crate) fn transpose(
    build: Build,
    src: &[f32],
    ss: usize,
    dst: &mut [f32],
    ds: usize,
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(cols <= ss && rows <= ds, "transpose: strides shorter than the rows");
    assert!(
        src.len() >= (rows - 1) * ss + cols && dst.len() >= (cols - 1) * ds + rows,
        "transpose: out of bounds"
    );
    let (r8, c8) = (rows - rows % 8, cols - cols % 8);
    let mut tiled = false;
    #[cfg(target_arch = "x86_64")]
    if build == Build::Avx2 && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present; the tiles lie within the bounds asserted above.
        unsafe { transpose_tiles_avx(src.as_ptr(), ss, dst.as_mut_ptr(), ds, r8, c8) };
        tiled = true;
    }
    for r in 0..rows {
        let c_from = if tiled && r < r8 { c8 } else { 0 };
        for c in c_from..cols {
            dst[c * ds + r] = src[r * ss + c];
        }
    }
}

/// The 8 x 8 tiles of [`transpose`] for `r < r8`, `c < c8` (multiples of 8): each tile is 8
/// row loads, the classic unpack / shuffle / lane-permute network, and 8 column stores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_tiles_avx(
    src: *const f32,
    ss: usize,
    dst: *mut f32,
    ds: usize,
    r8: usize,
    c8: usize,
) {
    use std::arch::x86_64::*;
    for r0 in (0..r8).step_by(8) {
        for c0 in (0..c8).step_by(8) {
            let s = src.add(r0 * ss + c0);
            let v: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(s.add(k * ss)));
            let t0 = _mm256_unpacklo_ps(v[0], v[1]);
            let t1 = _mm256_unpackhi_ps(v[0], v[1]);
            let t2 = _mm256_unpacklo_ps(v[2], v[3]);
            let t3 = _mm256_unpackhi_ps(v[2], v[3]);
            let t4 = _mm256_unpacklo_ps(v[4], v[5]);
            let t5 = _mm256_unpackhi_ps(v[4], v[5]);
            let t6 = _mm256_unpacklo_ps(v[6], v[7]);
            let t7 = _mm256_unpackhi_ps(v[6], v[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let out = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            let d = dst.add(c0 * ds + r0);
            for (k, o) in out.iter().enumerate() {
                _mm256_storeu_ps(d.add(k * ds), *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiled_transpose_is_a_transpose() {
        // Against the definition, for shapes with and without whole tiles and strides wider
        // than the rows.
        for (rows, cols, ss, ds) in
            [(8, 8, 8, 8), (17, 23, 23, 17), (44, 784, 784, 64), (784, 12, 32, 784), (3, 5, 9, 6)]
        {
            let src: Vec<f32> = (0..(rows - 1) * ss + cols).map(|i| i as f32).collect();
            // Each build on its own buffer, so one cannot hide the other's mistakes.
            for build in [Build::Baseline, Build::selected()] {
                let mut dst = vec![-1.0f32; (cols - 1) * ds + rows];
                transpose(build, &src, ss, &mut dst, ds, rows, cols);
                for r in 0..rows {
                    for c in 0..cols {
                        let got = dst[c * ds + r];
                        assert_eq!(got, src[r * ss + c], "{build:?} {rows}x{cols}: ({r}, {c})");
                    }
                }
                // Nothing outside the transposed entries is written.
                let written = (0..cols)
                    .flat_map(|c| (0..rows).map(move |r| c * ds + r))
                    .collect::<std::collections::HashSet<_>>();
                assert!(dst.iter().enumerate().all(|(i, v)| written.contains(&i) || *v == -1.0));
            }
        }
    }
}
