//! What the credential providers read: container and instance-metadata credentials, a
//! credential_process's output, the metadata service's role and token, STS AssumeRole, expiry
//! times, the profile files.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::aws_credentials(data));
