//! Reads from the device to the host, counted.
//!
//! On a GPU every read of a tensor's values waits for all queued work and
//! stalls the pipeline, so the training loop reads losses and metrics in
//! batches (every [`LearnerConfig::read_every`](crate::LearnerConfig) steps
//! and once per validation pass). Every such read goes through this module,
//! which counts them per thread, so tests can hold the loop to that.

use std::cell::Cell;

use candle_core::{DType, Result, Tensor};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// How many tensor reads to the host this thread's training loops made so far.
pub fn host_reads() -> u64 {
    READS.with(Cell::get)
}

fn count() {
    READS.with(|reads| reads.set(reads.get() + 1));
}

/// A rank-1 tensor's values as `f32`.
pub(crate) fn read_vec1(t: &Tensor) -> Result<Vec<f32>> {
    count();
    t.to_dtype(DType::F32)?.to_vec1()
}

/// A rank-2 tensor's values as `f32`, row by row.
pub(crate) fn read_vec2(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    count();
    t.to_dtype(DType::F32)?.to_vec2()
}

/// A scalar's value as `f32`.
pub(crate) fn read_scalar(t: &Tensor) -> Result<f32> {
    count();
    t.to_dtype(DType::F32)?.to_scalar()
}
