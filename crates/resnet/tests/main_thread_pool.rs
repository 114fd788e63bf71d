//! `cpu::use_main_thread_in_pool`: the calling thread becomes the global
//! pool's first thread where there are two threads or more, parallel work
//! still runs (from this thread and from others while it blocks), and with
//! one thread the pool is left alone. Its own test binary, because the
//! global pool is built once per process.

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use multilabel_resnet::cpu;
use rayon::prelude::*;

/// Set in the child process that checks the one-thread case.
const CHILD: &str = "MULTILABEL_TEST_ONE_THREAD_CHILD";

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[test]
fn calling_thread_joins_the_pool() {
    if std::env::var_os(CHILD).is_some() {
        // The child runs only the test below.
        return;
    }
    let joined = cpu::use_main_thread_in_pool();
    assert_eq!(joined, threads() >= 2, "{} threads", threads());
    if !joined {
        return;
    }
    assert_eq!(rayon::current_thread_index(), Some(0));
    assert_eq!(rayon::current_num_threads(), threads());
    // Built once: a second call changes nothing.
    assert!(!cpu::use_main_thread_in_pool());

    // Work handed to the pool by another thread runs while this one blocks.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let sum: u64 = (0..100_000u64).into_par_iter().sum();
        tx.send(sum).unwrap();
    });
    let sum = rx.recv_timeout(Duration::from_secs(60));
    assert_eq!(sum, Ok(100_000 * 99_999 / 2));

    // A parallel op from this thread gives the bits it gives on one thread.
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (8, 32, 20, 20), &dev).unwrap();
    let k = Tensor::randn(0f32, 0.1, (64, 32, 3, 3), &dev).unwrap();
    let bits = |t: Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    let here = bits(cpu::conv2d(&x, &k, 1, 1).unwrap());
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let alone = one.install(|| bits(cpu::conv2d(&x, &k, 1, 1).unwrap()));
    assert!(
        here == alone,
        "conv2d differs with the calling thread in the pool"
    );
}

#[test]
fn one_thread_leaves_the_pool_alone() {
    if std::env::var_os(CHILD).is_some() {
        std::thread::spawn(|| {
            assert!(!cpu::use_main_thread_in_pool());
            // The pool rayon builds on its own: this thread is not in it.
            assert_eq!(rayon::current_thread_index(), None);
            assert_eq!(rayon::current_num_threads(), 1);
        })
        .join()
        .unwrap();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "one_thread_leaves_the_pool_alone",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}
