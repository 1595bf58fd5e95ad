//! Keeps OpenBLAS off its generic kernels on CPUs newer than the library.
//!
//! A `DYNAMIC_ARCH` OpenBLAS (Debian's) picks its kernel set once, when the library loads, from
//! the CPU's family and model number. A model newer than the library is not in its table and gets
//! the oldest set: Debian 12's OpenBLAS 0.3.21 takes an Intel Xeon of family 6 model 207 (Emerald
//! Rapids, AVX-512 and AMX) for a "Prescott", and runs every sgemm with SSE3 kernels, a quarter of
//! the width the CPU has (docs/results.md, session 32, has the measured cost). The environment
//! variable `OPENBLAS_CORETYPE` names the set instead, but it is read only at load time, before
//! `main` runs, so the binary checks first thing ([`reexec_if_generic`]) and, when OpenBLAS fell
//! back to a set narrower than the CPU's instructions, starts itself again with the variable set.
//! A user's own `OPENBLAS_CORETYPE` always wins, and a name this table does not know (a newer
//! OpenBLAS's) is left alone. Under `ELRT_MAX_ISA` ([`super::isa`]) the set asked for stays
//! within the cap, narrower than OpenBLAS's own pick where need be.

use super::isa::Isa;

/// Set in the environment of the restarted process: the kernel set OpenBLAS picked by itself,
/// so that reports can say that elrt chose the one in use, and why.
pub const OWN_PICK_VAR: &str = "ELRT_OPENBLAS_OWN_PICK";

/// The widest vector instructions an OpenBLAS 0.3.x kernel set uses, by the name
/// `openblas_get_corename` returns; `None` for a name not listed (left alone).
pub fn kernel_width(core: &str) -> Option<Width> {
    let w = match core.to_ascii_lowercase().as_str() {
        "skylakex" | "cooperlake" | "sapphirerapids" => Width::Avx512,
        "haswell" | "zen" | "excavator" => Width::Avx2,
        "sandybridge" | "bulldozer" | "piledriver" | "steamroller" => Width::Avx,
        "prescott" | "katmai" | "coppermine" | "northwood" | "banias" | "core2" | "penryn"
        | "dunnington" | "nehalem" | "atom" | "athlon" | "opteron" | "opteron_sse3"
        | "barcelona" | "bobcat" | "nano" => Width::Sse,
        _ => return None,
    };
    Some(w)
}

/// Vector width classes, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Width {
    Sse,
    Avx,
    Avx2,
    Avx512,
}

/// What the CPU offers that OpenBLAS's kernel sets can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2_fma: bool,
    /// AVX512F, CD, BW, DQ and VL: what OpenBLAS's SkylakeX kernels need.
    pub avx512: bool,
    pub avx512_bf16: bool,
}

impl CpuFeatures {
    /// This machine's, read with `cpuid`.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx512 = has!("avx512f")
                && has!("avx512cd")
                && has!("avx512bw")
                && has!("avx512dq")
                && has!("avx512vl");
            CpuFeatures {
                avx2_fma: has!("avx2") && has!("fma"),
                avx512,
                avx512_bf16: avx512 && has!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuFeatures {
            avx2_fma: false,
            avx512: false,
            avx512_bf16: false,
        }
    }
}

/// The kernel set to ask for when OpenBLAS picked `own_pick` on a CPU with `cpu`, under the
/// engine's instruction-set cap `cap` ([`super::isa`]): the widest set the CPU runs within the
/// cap when OpenBLAS's pick is narrower, a set within the cap when its pick is wider (only a cap
/// does that), else `None`, as for a name this table does not know.
pub fn replacement(own_pick: &str, cpu: CpuFeatures, cap: Option<Isa>) -> Option<&'static str> {
    let have = kernel_width(own_pick)?;
    let cap = cap.unwrap_or(Isa::Avx512);
    match cap {
        Isa::Avx2 if have > Width::Avx2 => return Some("Haswell"),
        Isa::Sse2 if have > Width::Sse => return Some("Prescott"),
        _ => {}
    }
    let (name, width) = if cpu.avx512_bf16 && cap >= Isa::Avx512 {
        ("Cooperlake", Width::Avx512)
    } else if cpu.avx512 && cap >= Isa::Avx512 {
        ("SkylakeX", Width::Avx512)
    } else if cpu.avx2_fma && cap >= Isa::Avx2 {
        ("Haswell", Width::Avx2)
    } else {
        return None;
    };
    (have < width).then_some(name)
}

/// Starts this process again with `OPENBLAS_CORETYPE` set when OpenBLAS fell back to kernels
/// narrower than the CPU's (see the module doc). Returns only when nothing needs doing, or when
/// the restart failed (then with a warning: elrt runs on, slower). Call it first thing in `main`,
/// before any thread or file is opened: the new process image replaces this one.
pub fn reexec_if_generic() {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return;
    }
    let (own, _) = super::blas_core();
    let Some(want) = replacement(&own, CpuFeatures::detect(), super::isa::cap()) else {
        return;
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let arg0 = args.next();
        let exe = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => {
                warn_generic(&own, want, &e.to_string());
                return;
            }
        };
        let mut cmd = std::process::Command::new(exe);
        if let Some(a0) = arg0 {
            cmd.arg0(a0);
        }
        let err = cmd
            .args(args)
            .env("OPENBLAS_CORETYPE", want)
            .env(OWN_PICK_VAR, &own)
            .exec();
        warn_generic(&own, want, &err.to_string());
    }
    #[cfg(not(unix))]
    warn_generic(&own, want, "restarting is not supported on this platform");
}

fn warn_generic(own: &str, want: &str, why: &str) {
    eprintln!(
        "warning: OpenBLAS chose its {own} kernels for this CPU, which runs {want}'s; restarting \
         with OPENBLAS_CORETYPE={want} failed ({why}); set it yourself for full speed"
    );
}

/// The kernel set OpenBLAS picked by itself when elrt replaced it ([`reexec_if_generic`]).
pub fn replaced_pick() -> Option<String> {
    std::env::var(OWN_PICK_VAR).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVX2: CpuFeatures = CpuFeatures {
        avx2_fma: true,
        avx512: false,
        avx512_bf16: false,
    };
    const AVX512: CpuFeatures = CpuFeatures {
        avx2_fma: true,
        avx512: true,
        avx512_bf16: false,
    };
    const AVX512_BF16: CpuFeatures = CpuFeatures {
        avx2_fma: true,
        avx512: true,
        avx512_bf16: true,
    };

    /// Without a cap.
    fn replacement_any(own: &str, cpu: CpuFeatures) -> Option<&'static str> {
        replacement(own, cpu, None)
    }

    #[test]
    fn a_cap_asks_for_kernels_within_it_and_never_wider_than_the_cpu() {
        let avx2 = Some(Isa::Avx2);
        assert_eq!(
            replacement("Cooperlake", AVX512_BF16, avx2),
            Some("Haswell")
        );
        assert_eq!(replacement("SkylakeX", AVX512, avx2), Some("Haswell"));
        assert_eq!(replacement("Prescott", AVX512_BF16, avx2), Some("Haswell"));
        assert_eq!(replacement("Haswell", AVX512, avx2), None);
        assert_eq!(replacement("Zen", AVX2, avx2), None);
        let sse2 = Some(Isa::Sse2);
        assert_eq!(replacement("SkylakeX", AVX512, sse2), Some("Prescott"));
        assert_eq!(replacement("Sandybridge", AVX2, sse2), Some("Prescott"));
        assert_eq!(replacement("Prescott", AVX512, sse2), None);
        // A cap at or above the CPU changes nothing.
        let avx512 = Some(Isa::Avx512);
        assert_eq!(
            replacement("Prescott", AVX512_BF16, avx512),
            Some("Cooperlake")
        );
        assert_eq!(replacement("Nehalem", AVX2, avx512), Some("Haswell"));
        assert_eq!(replacement("GraniteRapids", AVX512_BF16, avx2), None);
    }

    #[test]
    fn generic_kernels_on_a_wider_cpu_are_replaced_by_the_widest_it_runs() {
        assert_eq!(replacement_any("Prescott", AVX512_BF16), Some("Cooperlake"));
        assert_eq!(replacement_any("Prescott", AVX512), Some("SkylakeX"));
        assert_eq!(replacement_any("Nehalem", AVX2), Some("Haswell"));
        assert_eq!(replacement_any("Sandybridge", AVX2), Some("Haswell"));
        assert_eq!(replacement_any("Haswell", AVX512), Some("SkylakeX"));
    }

    #[test]
    fn kernels_as_wide_as_the_cpu_or_unknown_names_are_kept() {
        assert_eq!(replacement_any("Cooperlake", AVX512_BF16), None);
        assert_eq!(replacement_any("SkylakeX", AVX512_BF16), None);
        assert_eq!(replacement_any("Zen", AVX2), None);
        assert_eq!(replacement_any("Haswell", AVX2), None);
        // A newer OpenBLAS's name for a newer CPU: its own business.
        assert_eq!(replacement_any("GraniteRapids", AVX512_BF16), None);
        // Nothing wider to offer.
        let sse = CpuFeatures {
            avx2_fma: false,
            avx512: false,
            avx512_bf16: false,
        };
        assert_eq!(replacement_any("Prescott", sse), None);
    }
}
