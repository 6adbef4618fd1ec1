//! The AWS answers the control functions and their clients decode: ECS tasks and
//! services, EC2 network interfaces, CloudWatch datapoints, DynamoDB items, Secrets
//! Manager secrets, function-URL answers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::aws_answers(data));
