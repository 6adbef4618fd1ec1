//! A seeded random source and a trace hash, written here so the simulation depends on
//! nothing whose output could change between versions: a seed must replay forever.

use std::time::Duration;

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to pick faults.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose whole output is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// A value in `0..n` (0 when `n` is 0). The modulo bias is irrelevant for fault picking.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below(hi - lo + 1)
        }
    }

    /// A `usize` in `lo..=hi`.
    pub fn range_usize(&mut self, lo: usize, hi: usize) -> usize {
        self.range(lo as u64, hi as u64) as usize
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    /// A duration in `lo..=hi`, at microsecond granularity.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let lo_us = lo.as_micros() as u64;
        let hi_us = hi.as_micros() as u64;
        Duration::from_micros(self.range(lo_us, hi_us))
    }

    /// Picks one of `items` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A value with a wide spread: an order of magnitude picked first, then a value in it,
    /// so that 1, 100 and 100 000 are all common.
    pub fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let lo = lo.max(1);
        let bits_lo = 64 - lo.leading_zeros() as u64;
        let bits_hi = 64 - hi.max(lo).leading_zeros() as u64;
        let bits = self.range(bits_lo, bits_hi);
        let top = (1u64 << bits).saturating_sub(1).min(hi);
        let bottom = (1u64 << (bits - 1)).max(lo);
        self.range(bottom, top.max(bottom))
    }
}

/// The SplitMix64 output function; also a good 64-bit integer hash.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over everything that happens in a run: two runs of one seed must agree on it.
#[derive(Debug, Clone, Copy)]
pub struct TraceHash(u64);

impl Default for TraceHash {
    fn default() -> Self {
        TraceHash(0xcbf2_9ce4_8422_2325)
    }
}

impl TraceHash {
    /// Adds bytes.
    pub fn bytes(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Adds a number.
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// The byte at `offset` of direction `dir` of stream `stream` in a run: a pure function,
/// so a reader checks what it gets without anyone storing what was written.
pub fn pattern_byte(salt: u64, stream: u64, dir: u64, offset: u64) -> u8 {
    // A new 64-bit word every 8 bytes keeps this cheap; the word depends on all inputs so
    // that a shifted, repeated or foreign byte is caught.
    let word = mix(salt ^ (stream << 40) ^ (dir << 39) ^ (offset >> 3));
    (word >> ((offset & 7) * 8)) as u8
}

/// Fills `buf` with the pattern starting at `offset`.
pub fn fill_pattern(salt: u64, stream: u64, dir: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(salt, stream, dir, offset + i as u64);
    }
}

/// The first offset at which `data` (read from `offset` on) differs from the pattern.
pub fn pattern_mismatch(salt: u64, stream: u64, dir: u64, offset: u64, data: &[u8]) -> Option<u64> {
    data.iter()
        .enumerate()
        .find(|(i, &b)| b != pattern_byte(salt, stream, dir, offset + *i as u64))
        .map(|(i, _)| offset + i as u64)
}
