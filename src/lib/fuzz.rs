//! The harness of the property tests that feed damaged copies of real inputs to the parsers of
//! untrusted bytes (bundles, CVDs, cdiffs, manifests, poll answers): a seeded generator, byte
//! mutations, and a loop that runs a fixed number of cases in CI or more for `PM_FUZZ_SECONDS`.
//!
//! Every case gets its own seed, derived from a fixed one, so CI runs the same cases each time
//! and a failure names the seed that replays it alone (`PM_FUZZ_SEED`). A panic in a case,
//! whether from the parser or from a failed property, is reported with that seed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// Seed of the sequence of case seeds when `PM_FUZZ_SEED` does not name one case.
const FIRST_SEED: u64 = 0x9e37_79b9;

pub(crate) use crate::rng::Rng;

/// What a campaign ran, for the test to print or check.
pub(crate) struct Campaign {
    /// Cases run.
    pub(crate) cases: u64,
    /// Cases whose damaged input the parser still accepted.
    pub(crate) accepted: u64,
    /// Whether `PM_FUZZ_SEED` replayed one case instead of the whole campaign.
    pub(crate) replay: bool,
}

/// Runs `case` on case seeds until `ci_cases` ran and `PM_FUZZ_SECONDS` (default 0) passed, or
/// only on the seed `PM_FUZZ_SEED` names. `case` returns whether the parser accepted its
/// damaged input; it asserts its properties itself, and a panic is re-raised naming the seed.
/// Prints (with `--nocapture`) how many cases ran.
pub(crate) fn campaign(name: &str, ci_cases: u64, mut case: impl FnMut(u64) -> bool) -> Campaign {
    let number = |var: &str| std::env::var(var).ok().and_then(|s| s.parse::<u64>().ok());
    let replay = number("PM_FUZZ_SEED");
    let seconds = number("PM_FUZZ_SECONDS").unwrap_or(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut seeds = Rng::new(FIRST_SEED);
    let (mut cases, mut accepted) = (0u64, 0u64);
    loop {
        let seed = match replay {
            Some(seed) if cases == 0 => seed,
            Some(_) => break,
            None if cases >= ci_cases && Instant::now() >= deadline => break,
            None => seeds.next() | 1,
        };
        match catch_unwind(AssertUnwindSafe(|| case(seed))) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                panic!(
                    "{name}: case seed {seed} failed, replay with PM_FUZZ_SEED={seed}: {message}"
                );
            }
        }
        cases += 1;
    }
    eprintln!(
        "{name}: {cases} cases in {:.1} s, {accepted} damaged inputs accepted",
        started.elapsed().as_secs_f64()
    );
    Campaign {
        cases,
        accepted,
        replay: replay.is_some(),
    }
}

/// A copy of a real input being damaged. Half of the damage lands at or after `focus`, so the
/// parts behind a checksum or signature get exercised and not only the check.
pub(crate) struct Damage<'r> {
    /// The damaged bytes so far.
    pub(crate) bytes: Vec<u8>,
    focus: usize,
    /// The case's generator.
    pub(crate) rng: &'r mut Rng,
}

impl<'r> Damage<'r> {
    /// Starts from a copy of `original`.
    pub(crate) fn new(original: &[u8], focus: usize, rng: &'r mut Rng) -> Damage<'r> {
        Damage {
            bytes: original.to_vec(),
            focus,
            rng,
        }
    }

    /// A position in `0..=len`, half of the time at or after the focus.
    pub(crate) fn spot(&mut self) -> usize {
        let len = self.bytes.len();
        if self.focus < len && self.rng.below(2) == 0 {
            self.focus + self.rng.below(len - self.focus + 1)
        } else {
            self.rng.below(len + 1)
        }
    }

    /// Flips one to eight bits.
    pub(crate) fn flip_bits(&mut self) {
        for _ in 0..1 + self.rng.below(8) {
            let at = self.spot();
            let bit = self.rng.below(8);
            if let Some(byte) = self.bytes.get_mut(at) {
                *byte ^= 1 << bit;
            }
        }
    }

    /// Cuts the input short.
    pub(crate) fn truncate(&mut self) {
        let at = self.spot();
        self.bytes.truncate(at);
    }

    /// Inserts up to `max` random bytes.
    pub(crate) fn insert_junk(&mut self, max: usize) {
        let at = self.spot();
        let junk: Vec<u8> = (0..self.rng.below(max + 1))
            .map(|_| self.rng.next() as u8)
            .collect();
        self.bytes.splice(at..at, junk);
    }

    /// Overwrites up to `max` bytes with random ones.
    pub(crate) fn scramble(&mut self, max: usize) {
        let at = self.spot();
        let end = (at + self.rng.below(max + 1)).min(self.bytes.len());
        for byte in self.bytes.get_mut(at..end).unwrap_or_default() {
            *byte = self.rng.next() as u8;
        }
    }

    /// Removes up to `max` bytes.
    pub(crate) fn remove(&mut self, max: usize) {
        let at = self.spot();
        let end = (at + self.rng.below(max + 1)).min(self.bytes.len());
        self.bytes.drain(at.min(end)..end);
    }

    /// Copies a range of up to `max` bytes (or, with `block` > 1, one `block`-aligned block)
    /// to another place.
    pub(crate) fn duplicate(&mut self, max: usize, block: usize) {
        let block = block.max(1);
        let start = self.spot() / block * block;
        let len = if block > 1 {
            block
        } else {
            self.rng.below(max + 1)
        };
        let Some(copy) = self.bytes.get(start..start + len).map(<[u8]>::to_vec) else {
            return;
        };
        let at = (self.spot() / block * block).min(self.bytes.len());
        self.bytes.splice(at..at, copy);
    }

    /// Inserts one of `tokens` (delimiters, keywords, huge numbers of the format).
    pub(crate) fn insert_token(&mut self, tokens: &[&[u8]]) {
        let at = self.spot();
        let token = self.rng.pick(tokens).to_vec();
        self.bytes.splice(at..at, token);
    }

    /// Overwrites bytes with one of `tokens`.
    pub(crate) fn overwrite_token(&mut self, tokens: &[&[u8]]) {
        let at = self.spot();
        let token = self.rng.pick(tokens);
        let end = (at + token.len()).min(self.bytes.len());
        let n = end.saturating_sub(at);
        if let (Some(target), Some(source)) = (self.bytes.get_mut(at..end), token.get(..n)) {
            target.copy_from_slice(source);
        }
    }

    /// Replaces the run of ASCII digits at a spot (if any) with one of `tokens`.
    pub(crate) fn replace_number(&mut self, tokens: &[&[u8]]) {
        let at = self.spot();
        let Some(start) = self.bytes.get(at..).and_then(|rest| {
            rest.iter()
                .position(u8::is_ascii_digit)
                .map(|offset| at + offset)
        }) else {
            return;
        };
        let end = self.bytes[start..]
            .iter()
            .position(|b| !b.is_ascii_digit())
            .map_or(self.bytes.len(), |offset| start + offset);
        let token = self.rng.pick(tokens).to_vec();
        self.bytes.splice(start..end, token);
    }

    /// One to four of the mutations above, chosen at random; `tokens` feeds the token ones.
    pub(crate) fn any(&mut self, tokens: &[&[u8]]) {
        for _ in 0..1 + self.rng.below(4) {
            self.one(tokens);
        }
    }

    /// One of the mutations above, chosen at random.
    pub(crate) fn one(&mut self, tokens: &[&[u8]]) {
        match self.rng.below(9) {
            0 => self.flip_bits(),
            1 => self.truncate(),
            2 => self.insert_junk(64),
            3 => self.scramble(64),
            4 => self.remove(64),
            5 => self.duplicate(256, 1),
            6 => self.insert_token(tokens),
            7 => self.overwrite_token(tokens),
            _ => self.replace_number(tokens),
        }
    }
}

/// JSON syntax and values at and past the limits of JSON numbers, strings and timestamps: the
/// tokens every JSON parser's damage draws from.
pub(crate) const JSON_SYNTAX: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"4294967296",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e999",
    b"\\u0000",
    b"\\ud800",
    b"9999-12-31T23:59:59Z",
    b"+275760-09-13T00:00:00Z",
];

/// [`JSON_SYNTAX`] and a format's own tokens (field names, values of its types).
pub(crate) fn json_tokens(extra: &[&'static [u8]]) -> Vec<&'static [u8]> {
    JSON_SYNTAX.iter().chain(extra).copied().collect()
}
