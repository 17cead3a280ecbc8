//! Seed derivation. Every random stream in `lmc` is a ChaCha8 generator seeded from a user seed and
//! a purpose tag (and, where it matters, an epoch), so that resuming mid-run and changing the thread
//! count never change which random numbers a computation sees.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What a random stream is used for; mixed into the seed so that streams never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Parameter initialisation.
    Init = 1,
    /// Data order (shuffling) of one epoch.
    Order = 2,
    /// Data augmentation of one epoch.
    Augment = 3,
    /// Anything else a stage needs (pruning ties, random masks, probe directions...).
    Other = 4,
}

/// SplitMix64 finaliser: a cheap bijective mixer so nearby seeds give unrelated streams.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator for `stream` of `seed`, sub-stream `index` (e.g. the epoch).
pub fn rng(seed: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(seed ^ mix(stream as u64)) ^ index))
}
