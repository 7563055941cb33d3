//! [`Wide`]: the exact accumulator of job partials. A 384-bit two's-complement integer counting
//! units of 2^-[`FIXED_FRAC_BITS`], so any finite `f64` whose magnitude is below 2^327 (about
//! 2.7e98) converts exactly up to that resolution, and sums of them are exact and associative.
//!
//! Why this width: a job sums values derived from `f32` features (at most about 3.4e38, 2^128),
//! their squares (2^256) and those over up to 2^40 rows (2^296), plus the 56 fraction bits:
//! 352 bits and a sign fit in 384. An `i128` (the previous accumulator) held only 2.4e21, so a
//! column of millisecond timestamps (1.7e12, squared 2.9e24) could not be summed. Values and
//! sums beyond the width are refused ([`WideError`]), never capped.

use tidepool_runtime::codec::FIXED_FRAC_BITS;

/// 64-bit limbs of a [`Wide`].
pub const LIMBS: usize = 6;

/// Magnitudes at or above this (2^327) do not fit a [`Wide`] once scaled by 2^56.
pub const WIDE_LIMIT: f64 = 2.734_063_405_978_765e98;

/// A value or a sum that does not fit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WideError {
    /// NaN or infinite.
    #[error("{0} is not finite")]
    NotFinite(f64),
    /// At or above [`WIDE_LIMIT`] in magnitude.
    #[error("{0:e} is beyond the exact range (|x| < 2^327, about 2.7e98)")]
    TooLarge(f64),
    /// A sum left the exact range.
    #[error("a sum left the exact range (|sum| < 2^327)")]
    SumOverflow,
}

/// A fixed-point number: `limbs` (little-endian, two's complement) times 2^-56.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wide {
    pub limbs: [u64; LIMBS],
}

impl Wide {
    /// Zero.
    pub const ZERO: Wide = Wide { limbs: [0; LIMBS] };

    fn negative(&self) -> bool {
        self.limbs[LIMBS - 1] >> 63 == 1
    }

    fn negated(mut self) -> Wide {
        let mut carry = 1u64;
        for l in &mut self.limbs {
            let (v, c) = (!*l).overflowing_add(carry);
            *l = v;
            carry = u64::from(c);
        }
        self
    }

    /// `x` rounded to the nearest 2^-56 (halves away from zero, as `f64::round`).
    pub fn from_f64(x: f64) -> Result<Wide, WideError> {
        if !x.is_finite() {
            return Err(WideError::NotFinite(x));
        }
        if x.abs() >= WIDE_LIMIT {
            return Err(WideError::TooLarge(x));
        }
        if x == 0.0 {
            return Ok(Wide::ZERO);
        }
        let bits = x.to_bits();
        let exp = ((bits >> 52) & 0x7ff) as i32;
        let frac = bits & ((1u64 << 52) - 1);
        // |x| = m * 2^e exactly.
        let (m, e) = if exp == 0 {
            (frac, -1074)
        } else {
            (frac | (1u64 << 52), exp - 1075)
        };
        let shift = e + FIXED_FRAC_BITS as i32;
        let mut w = Wide::ZERO;
        if shift >= 0 {
            // |x| < 2^327 keeps m << shift below 2^383.
            let (limb, bit) = ((shift / 64) as usize, (shift % 64) as u32);
            w.limbs[limb] = m << bit;
            if bit > 0 && limb + 1 < LIMBS {
                w.limbs[limb + 1] = m >> (64 - bit);
            }
        } else {
            let k = (-shift) as u32;
            // m < 2^53: from 2^-64 down it rounds to zero.
            let q = if k >= 64 {
                0
            } else {
                let q = m >> k;
                let half = 1u64 << (k - 1);
                q + u64::from(m & ((1u64 << k) - 1) >= half)
            };
            w.limbs[0] = q;
        }
        Ok(if x < 0.0 { w.negated() } else { w })
    }

    /// `v` units of 2^-56.
    pub fn from_i128(v: i128) -> Wide {
        let u = v as u128;
        let fill = if v < 0 { u64::MAX } else { 0 };
        let mut limbs = [fill; LIMBS];
        limbs[0] = u as u64;
        limbs[1] = (u >> 64) as u64;
        Wide { limbs }
    }

    /// The value as units of 2^-56 in an `i128`, if it fits.
    pub fn to_i128(&self) -> Option<i128> {
        let low = i128::from(self.limbs[0]) | (i128::from(self.limbs[1]) << 64);
        (Wide::from_i128(low) == *self).then_some(low)
    }

    /// `self + o`, or [`WideError::SumOverflow`].
    pub fn checked_add(&self, o: &Wide) -> Result<Wide, WideError> {
        let mut out = Wide::ZERO;
        let mut carry = 0u64;
        for i in 0..LIMBS {
            let (a, c1) = self.limbs[i].overflowing_add(o.limbs[i]);
            let (b, c2) = a.overflowing_add(carry);
            out.limbs[i] = b;
            carry = u64::from(c1) + u64::from(c2);
        }
        if self.negative() == o.negative() && out.negative() != self.negative() {
            return Err(WideError::SumOverflow);
        }
        Ok(out)
    }

    /// The value as the nearest `f64` (rounded once, ties to even).
    pub fn to_f64(&self) -> f64 {
        let scale = (1u128 << FIXED_FRAC_BITS) as f64;
        // The common case, every sum of unit-scale data: one conversion, as the i128 one was.
        if let Some(v) = self.to_i128() {
            return v as f64 / scale;
        }
        let neg = self.negative();
        let mag = if neg { self.negated() } else { *self };
        // Beyond an i128 the top limb in use is at least the second.
        let top = (1..LIMBS).rev().find(|&i| mag.limbs[i] != 0).unwrap_or(1);
        // The top 64 bits from the highest one down, with any lower bit set folded into the
        // last one (sticky): 11 spare bits below the 53 kept make the one rounding of
        // `as f64` exact.
        let z = mag.limbs[top].leading_zeros();
        let below = mag.limbs[top - 1];
        let t = if z == 0 {
            mag.limbs[top]
        } else {
            (mag.limbs[top] << z) | (below >> (64 - z))
        };
        let dropped = (below << z != 0 && z < 64) || mag.limbs[..top - 1].iter().any(|&l| l != 0);
        let lo = (top as i32 - 1) * 64 + (64 - z as i32);
        let v = (t | u64::from(dropped)) as f64 * 2f64.powi(lo) / scale;
        if neg {
            -v
        } else {
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: f64 = (1u128 << FIXED_FRAC_BITS) as f64;

    /// (The old accumulator admitted up to 4.7e21, but 4.7e21 * 2^56 is above 2^127: its cast
    /// silently capped values from about 2.4e21 on. Those are exact now.)
    #[test]
    fn values_the_i128_accumulator_held_convert_as_it_did() {
        for x in [
            0.0, 1.0, -1.0, 0.5, 1e-17, -3.25e-9, 123.456, -9.87e20, 2.3e21, 1e-30,
        ] {
            let old = (x * ONE).round() as i128;
            let w = Wide::from_f64(x).unwrap();
            assert_eq!(w.to_i128(), Some(old), "{x}");
            assert_eq!(w, Wide::from_i128(old));
            assert_eq!(w.to_f64(), old as f64 / ONE, "{x}");
        }
    }

    #[test]
    fn large_values_sum_exactly_in_any_order() {
        // Millisecond timestamps and their squares: beyond the old accumulator.
        let xs: Vec<f64> = (0..1000)
            .map(|i| 1.7e12 + f64::from(i) * 977.0)
            .map(|t| t * t)
            .collect();
        let sum = |it: &mut dyn Iterator<Item = &f64>| {
            it.fold(Wide::ZERO, |a, x| {
                a.checked_add(&Wide::from_f64(*x).unwrap()).unwrap()
            })
        };
        let fwd = sum(&mut xs.iter());
        let rev = sum(&mut xs.iter().rev());
        assert_eq!(fwd, rev);
        let approx: f64 = xs.iter().sum();
        assert!((fwd.to_f64() - approx).abs() / approx < 1e-12);
        assert!(fwd.to_i128().is_none(), "beyond an i128");
    }

    /// Beyond an i128 the conversion back rounds once, to nearest, ties to even: bits far below
    /// the kept 53 still decide a tie.
    #[test]
    fn wide_values_round_once_to_nearest_even() {
        let p = |e: i32| 2f64.powi(e);
        let sum = |xs: &[f64]| {
            xs.iter().fold(Wide::ZERO, |a, x| {
                a.checked_add(&Wide::from_f64(*x).unwrap()).unwrap()
            })
        };
        // The ulp of 2^200 is 2^148: half of it is a tie, to even (down).
        assert_eq!(sum(&[p(200), p(147)]).to_f64(), p(200));
        // A tie plus anything, however small, rounds up.
        assert_eq!(sum(&[p(200), p(147), p(-50)]).to_f64(), p(200) + p(148));
        // Below half: down; negatives mirror.
        assert_eq!(sum(&[p(200), p(146), p(-50)]).to_f64(), p(200));
        assert_eq!(
            sum(&[-p(200), -p(147), -p(-50)]).to_f64(),
            -(p(200) + p(148))
        );
        // An odd last bit ties up to even.
        let odd = p(200) + p(148);
        assert_eq!(sum(&[odd, p(147)]).to_f64(), p(200) + p(149));
    }

    /// Every value whose last bit is no finer than 2^-56 (from 1/16 up) converts exactly.
    #[test]
    fn conversions_round_trip_across_the_range() {
        let mut x = 0.0625;
        while x < 1e98 {
            for v in [x, -x, x * 1.618_033_988_7] {
                assert_eq!(Wide::from_f64(v).unwrap().to_f64(), v, "{v}");
            }
            x *= 7.3;
        }
    }

    #[test]
    fn what_does_not_fit_is_refused() {
        assert_eq!(
            Wide::from_f64(f64::NAN).unwrap_err().to_string(),
            "NaN is not finite"
        );
        assert!(matches!(Wide::from_f64(3e98), Err(WideError::TooLarge(_))));
        assert!(Wide::from_f64(2.7e98).is_ok());
        let capped = Wide::from_f64(4.6e21).unwrap();
        assert_eq!(capped.to_i128(), None, "beyond an i128, not capped to it");
        assert_eq!(capped.to_f64(), 4.6e21);
        let big = Wide::from_f64(2.7e98).unwrap();
        assert_eq!(big.checked_add(&big), Err(WideError::SumOverflow));
        let neg = Wide::from_f64(-2.7e98).unwrap();
        assert_eq!(neg.checked_add(&neg), Err(WideError::SumOverflow));
        assert_eq!(big.checked_add(&neg), Ok(Wide::ZERO));
    }
}
