//! The aws crate against moto with IAM checks on.

use fluidity_aws::clients::sts::StsClient;
use fluidity_tests::moto::Moto;

#[test]
fn sts_get_caller_identity_names_the_signer() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let me = StsClient::new(&moto.aws_config(&alice))
        .get_caller_identity()
        .expect("GetCallerIdentity");
    assert_eq!(me.arn, alice.arn);
}

#[test]
fn wrong_secret_is_refused() {
    let mut moto = Moto::start();
    let alice = moto.create_user("alice");
    let err = StsClient::new(&moto.aws_config(&alice.with_wrong_secret()))
        .get_caller_identity()
        .expect_err("a wrong secret must fail");
    assert_eq!(err.code(), Some("SignatureDoesNotMatch"), "{err}");
    eprintln!("{err}");
    moto.reset();
    let err = StsClient::new(&moto.aws_config(&alice))
        .get_caller_identity()
        .expect_err("keys from before the reset must fail");
    eprintln!("{err}");
    let bob = moto.create_user("bob");
    let me = StsClient::new(&moto.aws_config(&bob))
        .get_caller_identity()
        .unwrap();
    assert_eq!(me.arn, bob.arn);
}
