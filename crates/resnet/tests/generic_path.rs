//! The generic path (what CUDA and Metal run) forced on the CPU
//! (`Kernels::Generic`) against the CPU kernels: see `paths/mod.rs`.

mod paths;

use candle_core::Device;
use multilabel_resnet::Arch;

#[test]
fn conv2d_forward_and_gradients() {
    paths::conv2d_forward_and_gradients(&Device::Cpu);
}

#[test]
fn max_pool_forward_and_gradient() {
    paths::max_pool_forward_and_gradient(&Device::Cpu);
}

#[test]
fn batch_norm_train_and_eval() {
    paths::batch_norm_train_and_eval(&Device::Cpu);
}

#[test]
fn fused_block_nodes() {
    paths::fused_block_nodes(&Device::Cpu);
}

#[test]
fn resnet18_training_step() {
    paths::whole_network_step(&Device::Cpu, Arch::ResNet18, (16, 4, 64), true);
}

#[test]
fn resnet50_training_step() {
    paths::whole_network_step(&Device::Cpu, Arch::ResNet50, (64, 4, 64), false);
}

#[test]
fn generic_path_stays_in_f32() {
    paths::generic_path_stays_in_f32(&Device::Cpu);
}
