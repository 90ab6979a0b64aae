//! Waves: each machine derives a stable seed from its machine-id; a release's rollout window maps
//! seeds to start times, so a bad release reaches a few machines before all of them.

use sha2::{Digest, Sha256};

/// Seeds run from 0 to `SEEDS - 1`.
pub const SEEDS: u64 = 2048;

/// The machine's seed.
pub fn seed(machine_id: &str) -> u64 {
    let d = Sha256::digest(format!("caisson-wave\0{}", machine_id.trim()).as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b) % SEEDS
}

/// When a machine with `seed` may start on a release published at `published_at` with a rollout
/// of `rollout_seconds`: seed 0 at once, the last seed at the end of the window.
pub fn start_time(seed: u64, published_at: u64, rollout_seconds: u64) -> u64 {
    published_at + (rollout_seconds as u128 * seed.min(SEEDS - 1) as u128 / SEEDS as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_stable_and_spread() {
        assert_eq!(seed("abc"), seed("abc\n"));
        let seeds: Vec<u64> = (0..1000).map(|i| seed(&format!("{i:032x}"))).collect();
        assert!(seeds.iter().all(|s| *s < SEEDS));
        let early = seeds.iter().filter(|s| **s < SEEDS / 4).count();
        assert!((150..350).contains(&early), "{early}");
    }

    #[test]
    fn window_maps_seeds_to_times() {
        assert_eq!(start_time(0, 1000, 3600), 1000);
        assert_eq!(start_time(1024, 1000, 3600), 2800);
        assert!(start_time(SEEDS - 1, 1000, 3600) < 4600);
        assert_eq!(start_time(500, 1000, 0), 1000);
    }
}
