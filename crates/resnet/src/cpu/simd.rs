//! Run-time SIMD dispatch for our own CPU kernels.
//!
//! The crate is compiled for baseline x86-64 (SSE2), so that one binary runs
//! on any x86-64 CPU. The hot loops (BatchNorm, im2col/col2im, the fused
//! epilogues, ReLU masks, max-pool) are written with independent lane
//! accumulators so that they vectorise; [`simd_kernel!`] compiles each of
//! them three times — baseline, AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4)
//! — and picks one per call from the CPU's features, detected once.
//!
//! The three builds do the same floating-point operations in the same order
//! (Rust never contracts a multiply and an add into an FMA on its own), so
//! results are bit-identical whichever runs: `tests/simd.rs` checks it on
//! every level the machine has.

use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction set our own kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// SSE2: any x86-64 CPU (and every other architecture: its own baseline).
    Baseline,
    /// AVX2 and FMA (x86-64-v3): 8 floats per instruction.
    Avx2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4): 16 floats per instruction.
    Avx512,
}

impl SimdLevel {
    /// `baseline`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Baseline => "baseline",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            2 => SimdLevel::Avx512,
            1 => SimdLevel::Avx2,
            _ => SimdLevel::Baseline,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            SimdLevel::Baseline => 0,
            SimdLevel::Avx2 => 1,
            SimdLevel::Avx512 => 2,
        }
    }
}

impl std::str::FromStr for SimdLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "baseline" | "sse2" => Ok(SimdLevel::Baseline),
            "avx2" => Ok(SimdLevel::Avx2),
            "avx512" | "avx-512" => Ok(SimdLevel::Avx512),
            other => Err(format!(
                "unknown SIMD level {other:?}; expected baseline, avx2 or avx512"
            )),
        }
    }
}

/// The best level this CPU supports.
pub fn detected_simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let v3 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("bmi1")
            && std::arch::is_x86_feature_detected!("bmi2");
        let v4 = v3
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if v4 {
            SimdLevel::Avx512
        } else if v3 {
            SimdLevel::Avx2
        } else {
            SimdLevel::Baseline
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        SimdLevel::Baseline
    }
}

/// The widest level `gemm` (the products of im2col and Winograd) runs at on
/// this CPU: its AVX-512 kernels are compiled in with the `gemm-avx512`
/// feature (on by default), its AVX2 ones always. Unlike our own kernels'
/// [`simd_level`], it cannot be lowered at run time.
pub fn gemm_simd_level() -> SimdLevel {
    let built = if cfg!(feature = "gemm-avx512") {
        SimdLevel::Avx512
    } else {
        SimdLevel::Avx2
    };
    detected_simd_level().min(built)
}

/// Not yet decided.
const UNSET: u8 = u8::MAX;
static LEVEL: AtomicU8 = AtomicU8::new(UNSET);

/// The level the kernels use now: the detected one, lowered by the
/// environment variable `MULTILABEL_SIMD` (`baseline`, `avx2`, `avx512`)
/// or by [`set_simd_level`].
pub fn simd_level() -> SimdLevel {
    let v = LEVEL.load(Ordering::Relaxed);
    if v != UNSET {
        return SimdLevel::from_u8(v);
    }
    let detected = detected_simd_level();
    let level = std::env::var("MULTILABEL_SIMD")
        .ok()
        .and_then(|s| s.parse::<SimdLevel>().ok())
        .map_or(detected, |wanted| wanted.min(detected));
    LEVEL.store(level.to_u8(), Ordering::Relaxed);
    level
}

/// Makes the kernels use `level` (for comparisons and tests); a level the
/// CPU lacks is refused. Returns the level used before.
pub fn set_simd_level(level: SimdLevel) -> Result<SimdLevel, String> {
    let detected = detected_simd_level();
    if level > detected {
        return Err(format!(
            "this CPU supports SIMD up to {}, not {}",
            detected.name(),
            level.name()
        ));
    }
    let before = simd_level();
    LEVEL.store(level.to_u8(), Ordering::Relaxed);
    Ok(before)
}

/// Defines `$vis fn $name(args) -> ret` that runs `$body(args)` compiled
/// for the current [`simd_level`]. `$body` must be an `#[inline(always)]`
/// function with the same (concrete, non-generic) signature, so that it is
/// compiled into each of the three variants.
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident => $body:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match $crate::cpu::simd::simd_level() {
                    // SAFETY: simd_level never exceeds what the CPU supports.
                    $crate::cpu::simd::SimdLevel::Avx512 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::simd::SimdLevel::Avx2 => return unsafe { v3($($arg),*) },
                    $crate::cpu::simd::SimdLevel::Baseline => {}
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use simd_kernel;
