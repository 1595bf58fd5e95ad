//! Run-time dispatch to vector builds of a kernel.
//!
//! The crate builds for baseline x86-64 (SSE2), so a kernel compiled as it stands runs four
//! lanes wide. [`simd_dispatch!`] defines a function that checks the CPU once per call and runs
//! the kernel's body compiled for the first listed feature it has (each build a small
//! `#[target_feature]` function into which the `#[inline(always)]` body is inlined, so the
//! compiler vectorises it at that width), else the baseline build. A closure does not inherit
//! its caller's target features, so the body's hot loops must sit in the body itself, not in a
//! closure it hands to another function.
//!
//! Users: the MaxPool plane (`pool.rs`), batch norm's elementwise passes, layer norm's and
//! group norm's row passes, the GELU and Erf maps (`act.rs`), Winograd's transforms, the
//! depthwise kernels (flat and channels-last) and the layout transposes (`conv/`). Not used
//! by `ops::wide_map` (generic over its closure, which a nested build function cannot take)
//! nor by `conv/weight_grad.rs` (a different body per feature: AVX-512 tiles, AVX2 + FMA
//! tiles) nor by batch norm's plane sums (`plane_sums.rs`: explicit AVX2 intrinsics beside a
//! scalar build of the same lanes).

/// `simd_dispatch! { [attrs] vis fn name(params..) [-> Ret] => body, (args..); ["avx512f", "avx2"] }`
/// defines `name`, which runs `body(args..)` built for the first listed feature the CPU has,
/// else the baseline build. `body` must be `#[inline(always)]`; `args` are the parameters'
/// names, in order (a method body is called as `Type::method` with the receiver first).
macro_rules! simd_dispatch {
    // Without a return type: as `-> ()`.
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident $params:tt => $body:path, $args:tt; [$($feat:tt),+ $(,)?]
    ) => {
        simd_dispatch! {
            $(#[$attr])*
            $vis fn $name $params -> () => $body, $args; [$($feat),+]
        }
    };
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident $params:tt -> $ret:ty => $body:path, $args:tt;
        [$($feat:tt),+ $(,)?]
    ) => {
        $(#[$attr])*
        #[allow(clippy::unused_unit)]
        $vis fn $name $params -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                $(
                    if $crate::engine::isa::cpu_has!($feat) {
                        #[target_feature(enable = $feat)]
                        #[allow(clippy::unused_unit)]
                        unsafe fn build $params -> $ret {
                            $body $args
                        }
                        // SAFETY: the CPU supports the feature, checked just above.
                        return unsafe { build $args };
                    }
                )+
            }
            $body $args
        }
    };
}

pub(crate) use simd_dispatch;
