//! Empty: the programs are the `svcplane-sock` binary (src/main.rs). This library target
//! exists so crates/dataplane can name this crate as a build-dependency, which reruns its
//! build script (and so the BPF build) when the programs change.
#![no_std]
