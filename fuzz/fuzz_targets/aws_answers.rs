//! The AWS answers the control functions decode: ECS tasks and services, EC2 network
//! interfaces, CloudWatch datapoints.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::aws_answers(data));
