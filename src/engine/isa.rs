//! Which vector instructions the engine may use: the CPU's, capped by `ELRT_MAX_ISA`.
//!
//! Every vector kernel picks its build at run time from what the CPU has (AVX-512, AVX2 + FMA,
//! or the SSE2 baseline). `ELRT_MAX_ISA=avx2` (or `sse2`) keeps the engine, and the OpenBLAS
//! kernel set elrt asks for, at or below that width, as `ONEDNN_MAX_CPU_ISA` and
//! `MKL_ENABLE_INSTRUCTIONS` do for PyTorch's libraries. Uses: timing on an AVX-512 machine what
//! an AVX2 fleet will get (scripts/bench_train.py `--max-isa avx2` caps PyTorch the same way),
//! running on a CPU whose AVX-512 clocks down or misbehaves, and checking the narrower builds
//! end to end. It does not make results bitwise equal to a real AVX2 machine's: some speed rules
//! also read the CPU's vendor and caches, which choose among kernels whose sums differ in order.
//!
//! Kernels ask through [`cpu_has!`], never `is_x86_feature_detected!` directly, so that the cap
//! holds everywhere.

use std::sync::OnceLock;

/// Whether `f32::mul_add` is one instruction here. Off it (x86-64 without FMA, as on CPUs
/// before Haswell or under `ELRT_MAX_ISA=sse2`) it is a call into libm's software `fmaf`: the
/// portable direct conv, whose sums are FMAs so that it agrees with the vector builds bit for
/// bit, ran ResNet-20's 16-channel layers at batch 64 in 2.8 s per step each way instead of
/// tens of milliseconds, so the speed rules keep layers off it there.
pub fn fast_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu_has!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        cfg!(any(target_arch = "aarch64", target_feature = "fma"))
    }
}

/// `cpu_has!("avx2")`: whether the CPU has the feature and `ELRT_MAX_ISA` allows it. x86-64
/// only, as `is_x86_feature_detected!` is.
macro_rules! cpu_has {
    ($feat:tt) => {
        ($crate::engine::isa::allows($feat) && std::arch::is_x86_feature_detected!($feat))
    };
}

pub(crate) use cpu_has;

/// The environment variable that caps the instruction set.
pub const VAR: &str = "ELRT_MAX_ISA";

/// Vector instruction set levels, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// x86-64's baseline: 128-bit SSE2 (and every non-x86 target).
    Sse2,
    /// AVX2 with FMA: 256-bit.
    Avx2,
    /// AVX-512F: 512-bit.
    Avx512,
}

impl Isa {
    /// The name `ELRT_MAX_ISA` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Sse2 => "sse2",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a value of `ELRT_MAX_ISA` (case-insensitive; `avx512` means no cap).
    pub fn parse(s: &str) -> Result<Isa, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sse2" | "baseline" => Ok(Isa::Sse2),
            "avx2" => Ok(Isa::Avx2),
            "avx512" | "avx512f" => Ok(Isa::Avx512),
            other => Err(format!(
                "{VAR}={other:?} is not an instruction set elrt knows: use avx512, avx2 or sse2"
            )),
        }
    }

    /// The level a `target_feature` name belongs to: the AVX-512 family, the 256-bit family
    /// (AVX, AVX2, FMA, F16C), else the baseline.
    pub fn of_feature(feature: &str) -> Isa {
        if feature.starts_with("avx512") {
            Isa::Avx512
        } else if matches!(feature, "avx" | "avx2" | "fma" | "f16c") {
            Isa::Avx2
        } else {
            Isa::Sse2
        }
    }
}

/// `ELRT_MAX_ISA` as set: `None` when unset or empty, an error line when it does not parse.
fn from_env() -> Result<Option<Isa>, String> {
    match std::env::var(VAR) {
        Ok(v) if !v.trim().is_empty() => Isa::parse(&v).map(Some),
        _ => Ok(None),
    }
}

/// The cap from `ELRT_MAX_ISA`, read once. A value that does not parse counts as no cap here;
/// the binary refuses it first thing ([`check_env`]).
pub fn cap() -> Option<Isa> {
    static CAP: OnceLock<Option<Isa>> = OnceLock::new();
    *CAP.get_or_init(|| from_env().ok().flatten())
}

/// An error line when `ELRT_MAX_ISA` holds a value that does not parse.
pub fn check_env() -> Result<(), String> {
    from_env().map(|_| ())
}

/// Whether the cap lets kernels use instructions of `feature`'s level (the CPU is asked
/// separately, by [`cpu_has!`]).
#[inline]
pub fn allows(feature: &str) -> bool {
    cap().is_none_or(|c| Isa::of_feature(feature) <= c)
}

/// Whether the CPU has AVX2 and FMA and the cap allows them: what the AVX2 builds of the conv
/// kernels (their tiles are FMA intrinsics) need. x86-64 only.
#[cfg(target_arch = "x86_64")]
pub fn avx2_fma() -> bool {
    cpu_has!("avx2") && cpu_has!("fma")
}

/// The widest level the engine's kernels run on this CPU under the cap (reports print it).
pub fn in_use() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu_has!("avx512f") {
            return Isa::Avx512;
        }
        if avx2_fma() {
            return Isa::Avx2;
        }
    }
    Isa::Sse2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unknown_names_are_refused_naming_the_variable() {
        for isa in [Isa::Sse2, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(isa.name()), Ok(isa));
        }
        assert_eq!(Isa::parse(" AVX2 "), Ok(Isa::Avx2));
        let e = Isa::parse("avx3").unwrap_err();
        assert!(e.contains("ELRT_MAX_ISA") && e.contains("avx3"), "{e}");
    }

    #[test]
    fn features_belong_to_their_width() {
        assert_eq!(Isa::of_feature("avx512f"), Isa::Avx512);
        assert_eq!(Isa::of_feature("avx512bw"), Isa::Avx512);
        assert_eq!(Isa::of_feature("avx2"), Isa::Avx2);
        assert_eq!(Isa::of_feature("fma"), Isa::Avx2);
        assert_eq!(Isa::of_feature("avx"), Isa::Avx2);
        assert_eq!(Isa::of_feature("sse4.1"), Isa::Sse2);
        assert!(Isa::Sse2 < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
    }
}
