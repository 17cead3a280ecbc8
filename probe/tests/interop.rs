//! safetensors round trip and the PyTorch layouts import accepts or refuses.

mod common;

use std::collections::HashMap;
use std::path::Path;

use lmc_probe::interop::{self, load_bytes};
use lmc_train::artifact::Provenance;
use lmc_train::params::Mask;
use safetensors::tensor::{Dtype, TensorView};

fn st(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (n.to_string(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, &None::<HashMap<String, String>>).unwrap()
}

/// The header's metadata comes first with its keys in order, so the same run exports to the
/// same bytes every time (safetensors writes a `HashMap`'s order, which changes from one map to
/// the next: before the keys were sorted, eight exports here were never all alike).
#[test]
fn exporting_twice_gives_the_same_bytes() {
    let ds = common::digits();
    let run = common::train(&ds, "mlp:8", None, 0, 1);
    let prov = Provenance::of("test", &1, &[]);
    let first = interop::export_bytes(&run, prov, true).unwrap();
    for _ in 0..7 {
        assert!(interop::export_bytes(&run, prov, true).unwrap() == first);
    }
    let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "safetensors pads its header to 8 bytes");
    let header = std::str::from_utf8(&first[8..8 + n]).unwrap();
    let at = |key: &str| header.find(&format!("\"{key}\":")).unwrap();
    let keys = ["__metadata__", "format", "lmc.dataset", "lmc.model", "lmc.provenance", "lmc.run"];
    assert_eq!(at(keys[0]), 1, "{header}");
    assert!(keys.windows(2).all(|w| at(w[0]) < at(w[1])), "{header}");
    // Still a file safetensors reads, with the same tensors.
    let loaded = load_bytes(Path::new("x.safetensors"), &first).unwrap();
    let (params, _) = loaded.to_params(Path::new("x"), &run.model.layout, false).unwrap();
    assert_eq!(params, run.params);
}

#[test]
fn export_import_round_trip_keeps_params_mask_and_run() {
    let ds = common::digits();
    let dense = common::train(&ds, "mlp:8", None, 0, 1);
    let mut mask = Mask::dense(&dense.model.layout);
    for i in (0..512).step_by(3) {
        mask.keep[i] = false;
    }
    let run = common::train(&ds, "mlp:8", Some(mask.clone()), 0, 1);
    let prov = Provenance::of("test", &1, &[]);
    let bytes = interop::export_bytes(&run, prov, true).unwrap();
    let path = Path::new("x.safetensors");
    let loaded = load_bytes(path, &bytes).unwrap();
    // PyTorch state-dict names, plus torch.nn.utils.prune-style masks for weights only.
    let names: Vec<&str> = loaded.tensors.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "fc.bias",
            "fc.weight",
            "fc.weight_mask",
            "fc_layers.0.bias",
            "fc_layers.0.weight",
            "fc_layers.0.weight_mask"
        ]
    );
    assert_eq!(loaded.tensors["fc_layers.0.weight"].0, vec![8, 64]);
    assert_eq!(loaded.metadata["format"], "pt");
    assert_eq!(loaded.metadata["lmc.provenance"], prov.hex());
    let (params, m) = loaded.to_params(path, &run.model.layout, false).unwrap();
    assert_eq!(params, run.params);
    assert_eq!(m, run.mask);
    let meta = loaded.run_metadata(path).unwrap().unwrap();
    assert_eq!(
        (meta.model, meta.dataset, meta.start, meta.data_seed),
        (run.model.clone(), run.dataset.clone(), run.start.clone(), run.data_seed)
    );
    assert_eq!(meta.curve.len(), run.curve.len());

    // Without masks: a plain state dict, read back as a dense mask.
    let plain = load_bytes(path, &interop::export_bytes(&run, prov, false).unwrap()).unwrap();
    assert_eq!(plain.tensors.len(), 4);
    let (p2, m2) = plain.to_params(path, &run.model.layout, false).unwrap();
    assert_eq!(p2, run.params);
    assert_eq!(m2, Mask::dense(&run.model.layout));
}

#[test]
fn pytorch_pruned_state_dicts_and_bad_files() {
    let ds = common::digits();
    let run = common::train(&ds, "mlp:", None, 0, 1);
    let layout = &run.model.layout; // fc.weight (10, 64), fc.bias (10)
    let path = Path::new("torch.safetensors");
    let w: Vec<f32> = (0..640).map(|i| i as f32 * 0.01 - 3.0).collect();
    let b: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let mut m: Vec<f32> = vec![1.0; 640];
    m[7] = 0.0;
    // torch.nn.utils.prune leaves weight_orig and weight_mask: the weight is their product.
    let f = load_bytes(
        path,
        &st(&[
            ("fc.weight_orig", vec![10, 64], w.clone()),
            ("fc.weight_mask", vec![10, 64], m.clone()),
            ("fc.bias", vec![10], b.clone()),
        ]),
    )
    .unwrap();
    let (p, mask) = f.to_params(path, layout, false).unwrap();
    assert_eq!(p.data[7], 0.0);
    assert_eq!(p.data[8], w[8]);
    assert!(!mask.keep[7] && mask.keep[8]);
    assert_eq!(&p.data[640..], &b[..]);
    assert!(f.run_metadata(path).unwrap().is_none());

    let err = |tensors: &[(&str, Vec<usize>, Vec<f32>)]| {
        load_bytes(path, &st(tensors))
            .unwrap()
            .to_params(path, layout, false)
            .unwrap_err()
            .to_string()
    };
    let e = err(&[("fc.weight", vec![64, 10], w.clone()), ("fc.bias", vec![10], b.clone())]);
    assert!(
        e.contains("torch.safetensors")
            && e.contains("'fc.weight' has shape [64, 10]")
            && e.contains("[10, 64]"),
        "{e}"
    );
    let e = err(&[("fc.weight", vec![10, 64], w.clone())]);
    assert!(e.contains("missing tensors") && e.contains("fc.bias"), "{e}");
    let e = err(&[
        ("fc.weight", vec![10, 64], w.clone()),
        ("fc.bias", vec![10], b.clone()),
        ("fc2.weight", vec![1], vec![0.0]),
    ]);
    assert!(e.contains("fc2.weight") && e.contains("--allow-extra"), "{e}");
    let mut half = m.clone();
    half[0] = 0.5;
    let e = err(&[
        ("fc.weight", vec![10, 64], w.clone()),
        ("fc.weight_mask", vec![10, 64], half),
        ("fc.bias", vec![10], b.clone()),
    ]);
    assert!(e.contains("0/1"), "{e}");
    let e = err(&[
        ("fc.weight", vec![10, 64], w.clone()),
        ("fc.bias", vec![10], b.clone()),
        ("fc.bias_mask", vec![10], vec![1.0; 10]),
    ]);
    assert!(e.contains("not prunable"), "{e}");
    let mut nan = w.clone();
    nan[3] = f32::NAN;
    let e = err(&[("fc.weight", vec![10, 64], nan), ("fc.bias", vec![10], b.clone())]);
    assert!(e.contains("non-finite"), "{e}");
    assert!(load_bytes(path, b"not a safetensors file")
        .unwrap_err()
        .to_string()
        .contains("not a valid safetensors"));
}

/// A safetensors file as its bytes are laid out: the header's length (u64 LE), the JSON header,
/// the data. What a hostile or buggy writer can put anywhere in it.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn hostile_safetensors_are_one_line_errors() {
    let ds = common::digits();
    let run = common::train(&ds, "mlp:", None, 0, 1);
    let layout = &run.model.layout; // fc.weight (10, 64), fc.bias (10)
    let path = Path::new("hostile.safetensors");
    let t = |name: &str, shape: &str, a: u64, b: u64| {
        format!(r#""{name}":{{"dtype":"F32","shape":{shape},"data_offsets":[{a},{b}]}}"#)
    };
    let w = t("fc.weight", "[10,64]", 0, 2560);
    let bias = t("fc.bias", "[10]", 2560, 2600);
    let data = vec![0u8; 2600];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "duplicate names",
            raw(&format!("{{{w},{bias},{}}}", t("fc.bias", "[10]", 2560, 2600)), &data),
        ),
        (
            "duplicate names, other data",
            raw(&format!("{{{w},{bias},{}}}", t("fc.bias", "[10]", 2600, 2640)), &[0u8; 2640]),
        ),
        ("offsets backwards", raw(&format!("{{{w},{}}}", t("fc.bias", "[10]", 2600, 2560)), &data)),
        (
            "offsets past the end",
            raw(&format!("{{{w},{}}}", t("fc.bias", "[10]", 2560, 1 << 40)), &data),
        ),
        ("offsets overlap", raw(&format!("{{{w},{}}}", t("fc.bias", "[10]", 0, 40)), &data)),
        (
            "2^40 elements",
            raw(&format!("{{{w},{}}}", t("fc.bias", "[1099511627776]", 2560, 2600)), &data),
        ),
        (
            "shape overflows",
            raw(
                &format!("{{{w},{}}}", t("fc.bias", "[4294967296,4294967296,4]", 2560, 2600)),
                &data,
            ),
        ),
        ("header length 2^40", {
            let mut b = raw(&format!("{{{w},{bias}}}"), &data);
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        }),
        ("header length u64::MAX", {
            let mut b = raw(&format!("{{{w},{bias}}}"), &data);
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("header not JSON", raw("{\"fc.weight\":", &data)),
        (
            "unknown dtype",
            raw(
                &format!("{{{w},{}}}", t("fc.bias", "[10]", 2560, 2600).replace("F32", "F99")),
                &data,
            ),
        ),
        ("empty", vec![]),
        ("short", vec![1, 2, 3]),
        (
            "metadata of another spec",
            raw(
                &format!(r#"{{"__metadata__":{{"lmc.run":"{{\"model\":3}}"}},{w},{bias}}}"#),
                &data,
            ),
        ),
    ];
    for (what, bytes) in cases {
        let r = std::panic::catch_unwind(|| {
            let l = load_bytes(path, &bytes)?;
            l.run_metadata(path)?;
            l.to_params(path, layout, false).map(|_| ())
        });
        let r = r.unwrap_or_else(|_| panic!("{what}: panicked"));
        let e = r.expect_err(what).to_string();
        assert!(e.starts_with("hostile.safetensors: ") && !e.contains('\n'), "{what}: {e}");
    }
    // Export of a Run built in memory whose layout names a tensor twice: safetensors would
    // panic indexing its header; export refuses first.
    let mut twice = run.clone();
    twice.model.layout.entries[1].name = twice.model.layout.entries[0].name.clone();
    twice.params.layout = twice.model.layout.clone();
    let r = std::panic::catch_unwind(|| interop::export_bytes(&twice, Provenance::default(), true));
    let e = r.expect("no panic").unwrap_err().to_string();
    assert!(e.contains("export") && e.contains("not that model's"), "{e}");
}
