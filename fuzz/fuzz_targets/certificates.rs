//! Certificates and keys as a peer or a file hands them over: DER, PEM, CA bundles.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_runtime_smol::fuzzing::certificates(data));
