//! Deterministic initial values.
//!
//! candle's CPU random generator cannot be seeded, so every random initial
//! value is drawn here from ChaCha8, seeded by the user's seed mixed with the
//! tensor's name. The values of one tensor therefore do not depend on the
//! order in which layers are built, and the same seed gives the same network
//! on every device.

use candle_core::{Device, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A generator for the tensor `name` under `seed`.
pub(crate) fn rng_for(seed: u64, name: &str) -> ChaCha8Rng {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ hash.rotate_left(17))
}

/// `n` samples of N(0, std²) (Box–Muller on f64, rounded to f32).
pub(crate) fn normal_values(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = std::f64::consts::TAU * u2;
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(n);
    values
}

/// Kaiming-normal values (gain √2, as for ReLU) for a weight with `fan` inputs or outputs.
pub(crate) fn kaiming_normal(seed: u64, name: &str, shape: &Shape, fan: usize) -> Vec<f32> {
    let std = (2.0 / fan as f64).sqrt();
    normal_values(&mut rng_for(seed, name), shape.elem_count(), std)
}

/// Overwrites `var` with `values` (f32, converted to the var's dtype).
pub(crate) fn set_var(var: &Var, values: Vec<f32>, device: &Device) -> candle_core::Result<()> {
    let tensor = Tensor::from_vec(values, var.shape(), device)?.to_dtype(var.dtype())?;
    var.set(&tensor)
}

/// Overwrites `var` with a constant.
pub(crate) fn fill_var(var: &Var, value: f64) -> candle_core::Result<()> {
    let tensor = (var.as_tensor().ones_like()? * value)?;
    var.set(&tensor)
}
