//! The CA function's CSR policy (PEM or DER CSRs), and signing with a fixed CA.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::ca_csr(data));
