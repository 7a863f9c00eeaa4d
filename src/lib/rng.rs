//! xorshift64*: a small deterministic generator, so a failure names a seed to replay. Test code
//! only: the lib's fuzz harness (`#[cfg(test)]`) and the integration tests (which include this
//! file by path) share it, and no binary ships it.

/// Replaces a zero seed, a fixed point of xorshift.
const ZERO_SEED_REPLACEMENT: u64 = 0x9e37_79b9;

/// The generator's state.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator; a zero seed (a fixed point of xorshift) is replaced.
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            ZERO_SEED_REPLACEMENT
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// One of `items`, which must not be empty.
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
