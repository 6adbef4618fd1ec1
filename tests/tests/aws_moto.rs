//! The aws crate against moto with IAM checks on: every typed client call, every way of
//! finding credentials, and the transport's retries and deadlines (against small local
//! HTTP servers where moto cannot misbehave on purpose).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fluidity_aws::chain::{AssumeRoleProvider, ContainerProvider};
use fluidity_aws::clients::cloudwatch::{CloudWatchClient, MetricDatum};
use fluidity_aws::clients::dynamodb::{attr_n, attr_s, get_n, get_s, DynamoDbClient, Item};
use fluidity_aws::clients::ec2::Ec2Client;
use fluidity_aws::clients::ecs::{EcsClient, TaskFilter};
use fluidity_aws::clients::lambda_url::FunctionUrlClient;
use fluidity_aws::clients::secrets::SecretsManagerClient;
use fluidity_aws::clients::sts::StsClient;
use fluidity_aws::{
    AwsConfig, ChainOptions, Endpoints, Env, Error, HttpClient, HttpConfig, ProvideCredentials,
    RetryPolicy,
};
use fluidity_tests::e2e::sha256_hex;
use fluidity_tests::moto::{Moto, ACCOUNT_ID, REGION};
use serde_json::json;

/// The identity `config` signs as, according to moto's STS.
fn whoami(config: &AwsConfig) -> String {
    StsClient::new(config)
        .get_caller_identity()
        .unwrap_or_else(|e| panic!("GetCallerIdentity: {e}"))
        .arn
}

#[test]
fn sts_get_caller_identity_names_the_signer() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let me = StsClient::new(&moto.aws_config(&alice))
        .get_caller_identity()
        .expect("GetCallerIdentity");
    assert_eq!(me.arn, alice.arn);
    assert_eq!(me.account, ACCOUNT_ID);
    assert!(!me.user_id.is_empty());
}

#[test]
fn sts_assume_role_gives_working_temporary_credentials() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let role = moto.create_role("tunnel-client", &alice.arn);
    let creds = StsClient::new(&moto.aws_config(&alice))
        .assume_role(&role.arn, "laptop", None, Some(Duration::from_secs(900)))
        .expect("AssumeRole");
    assert!(creds.session_token().is_some(), "temporary credentials");
    let expiry = creds.expiry().expect("an expiry");
    assert!(expiry > SystemTime::now(), "expiry in the future");
    assert_ne!(creds.access_key_id(), alice.access_key_id);
    let as_role = moto.aws_config_with(Arc::new(creds));
    assert_eq!(whoami(&as_role), role.assumed_arn("laptop"));
}

#[test]
fn a_wrong_secret_is_refused_with_signature_does_not_match_and_advice() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let err = StsClient::new(&moto.aws_config(&alice.with_wrong_secret()))
        .get_caller_identity()
        .expect_err("a wrong secret must fail");
    assert_eq!(err.code(), Some("SignatureDoesNotMatch"), "{err}");
    assert_eq!(err.status(), Some(403));
    assert!(!err.is_retryable(), "a bad signature is not retried: {err}");
    let message = err.to_string();
    assert!(message.contains("SignatureDoesNotMatch"), "{message}");
    assert!(
        message.contains("AWS_SECRET_ACCESS_KEY"),
        "the message says what to check: {message}"
    );
    assert!(
        !message.contains(&alice.secret_access_key),
        "no secret in errors"
    );
}

#[test]
fn an_unknown_key_and_a_missing_permission_are_refused() {
    let mut moto = Moto::start();
    let nobody = moto.create_user_with_policy("nobody", None);
    let err = SecretsManagerClient::new(&moto.aws_config(&nobody))
        .create_secret("s", "v", None)
        .expect_err("a user without policy is denied");
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(
        err.code().is_some_and(|c| c.contains("AccessDenied")),
        "{err}"
    );
    let alice = moto.create_user("alice");
    moto.reset();
    let err = StsClient::new(&moto.aws_config(&alice))
        .get_caller_identity()
        .expect_err("keys from before the reset are unknown");
    assert_eq!(err.code(), Some("InvalidClientTokenId"), "{err}");
    assert!(err.to_string().contains("access key"), "{err}");
}

#[test]
fn ecs_and_ec2_calls_see_a_fargate_task_and_its_network_interface() {
    let moto = Moto::start();
    let operator = moto.create_user("operator");
    let config = moto.aws_config(&operator);
    let fx = moto.create_ecs_service("fluidity", "server", 0);
    let ecs = EcsClient::new(&config);

    let updated = ecs
        .update_service(&fx.cluster, &fx.service, Some(1), false)
        .expect("UpdateService");
    assert_eq!(updated.desired_count, 1);
    assert_eq!(updated.service_arn, fx.service_arn);
    let (services, failures) = ecs
        .describe_services(&fx.cluster, &[&fx.service, "missing"])
        .expect("DescribeServices");
    assert_eq!(services.len(), 1, "{services:?}");
    assert_eq!(services[0].service_name, fx.service);
    assert_eq!(services[0].status, "ACTIVE");
    assert_eq!(services[0].desired_count, 1);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].reason.as_deref(), Some("MISSING"));

    let task = moto.run_fargate_task(&fx, "fluidity-wake");
    let task_arn = task["taskArn"].as_str().expect("a task ARN").to_string();
    let listed = ecs
        .list_tasks(
            &fx.cluster,
            &TaskFilter {
                started_by: Some("fluidity-wake".into()),
                ..TaskFilter::default()
            },
        )
        .expect("ListTasks");
    assert_eq!(listed, vec![task_arn.clone()]);
    let none = ecs
        .list_tasks(
            &fx.cluster,
            &TaskFilter {
                started_by: Some("someone-else".into()),
                ..TaskFilter::default()
            },
        )
        .expect("ListTasks");
    assert!(none.is_empty(), "{none:?}");

    let (tasks, failures) = ecs
        .describe_tasks(&fx.cluster, &[&task_arn])
        .expect("DescribeTasks");
    assert!(failures.is_empty(), "{failures:?}");
    let t = &tasks[0];
    assert_eq!(t.task_arn, task_arn);
    assert_eq!(t.last_status, "RUNNING");
    assert_eq!(t.started_by.as_deref(), Some("fluidity-wake"));
    assert_eq!(t.group.as_deref(), Some("service:server"));
    let eni = t.network_interface_id.clone().expect("an ENI attachment");
    let private_ip = t.private_ipv4.clone().expect("a private address");

    let ec2 = Ec2Client::new(&config);
    let found = ec2
        .describe_network_interfaces(&[&eni])
        .expect("DescribeNetworkInterfaces");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].id, eni);
    assert_eq!(found[0].private_ip.as_deref(), Some(private_ip.as_str()));
    assert_eq!(
        found[0].subnet_id.as_deref(),
        Some(fx.network.subnet_id.as_str())
    );
    assert_eq!(found[0].vpc_id.as_deref(), Some(fx.network.vpc_id.as_str()));
    assert_eq!(found[0].public_ip, None, "no public IP before association");

    let public_ip = moto.associate_public_ip(&eni);
    let found = ec2
        .describe_network_interfaces(&[&eni])
        .expect("DescribeNetworkInterfaces");
    assert_eq!(found[0].public_ip.as_deref(), Some(public_ip.as_str()));
}

#[test]
fn dynamodb_put_get_and_ttl() {
    let moto = Moto::start();
    let user = moto.create_user("control");
    moto.create_table("fluidity-state", "pk", None);
    let db = DynamoDbClient::new(&moto.aws_config(&user));
    db.update_time_to_live("fluidity-state", "expires", true)
        .expect("UpdateTimeToLive");
    let ttl = moto.json(
        fluidity_aws::Service::DynamoDb,
        "DescribeTimeToLive",
        &json!({ "TableName": "fluidity-state" }),
    );
    assert_eq!(
        ttl["TimeToLiveDescription"]["AttributeName"], "expires",
        "{ttl}"
    );

    let mut item = Item::new();
    item.insert("pk".into(), attr_s("server#1"));
    item.insert("ip".into(), attr_s("203.0.113.7"));
    item.insert("expires".into(), attr_n(1_900_000_000_i64));
    db.put_item("fluidity-state", &item).expect("PutItem");
    let mut key = Item::new();
    key.insert("pk".into(), attr_s("server#1"));
    let got = db
        .get_item("fluidity-state", &key, true)
        .expect("GetItem")
        .expect("the item");
    assert_eq!(get_s(&got, "ip"), Some("203.0.113.7"));
    assert_eq!(get_n(&got, "expires"), Some(1_900_000_000));
    key.insert("pk".into(), attr_s("server#2"));
    assert_eq!(
        db.get_item("fluidity-state", &key, false).expect("GetItem"),
        None
    );

    let err = db
        .put_item("no-such-table", &item)
        .expect_err("a missing table");
    assert_eq!(err.code(), Some("ResourceNotFoundException"), "{err}");
}

#[test]
fn secrets_manager_create_put_get() {
    let moto = Moto::start();
    let user = moto.create_user("ca");
    let sm = SecretsManagerClient::new(&moto.aws_config(&user));
    let arn = sm
        .create_secret("fluidity/ca-key", "first", Some("test CA key"))
        .expect("CreateSecret");
    assert!(arn.starts_with("arn:aws:secretsmanager:"), "{arn}");
    let v1 = sm
        .get_secret_value("fluidity/ca-key")
        .expect("GetSecretValue");
    assert_eq!(v1.secret_string.as_deref(), Some("first"));
    assert_eq!(v1.arn, arn);
    let version = sm.put_secret_value(&arn, "second").expect("PutSecretValue");
    let v2 = sm.get_secret_value(&arn).expect("GetSecretValue");
    assert_eq!(v2.secret_string.as_deref(), Some("second"));
    assert_eq!(v2.version_id, version);
    assert_ne!(v2.version_id, v1.version_id);
    assert!(
        !format!("{v2:?}").contains("second"),
        "Debug hides the value"
    );
    let err = sm.get_secret_value("missing").expect_err("no such secret");
    assert_eq!(err.code(), Some("ResourceNotFoundException"), "{err}");
}

#[test]
fn cloudwatch_put_metric_data_then_get_metric_statistics_and_data() {
    let moto = Moto::start();
    let user = moto.create_user("server");
    let cw = CloudWatchClient::new(&moto.aws_config(&user));
    let now = SystemTime::now();
    let datum = |value: f64| MetricDatum {
        name: "ActiveConnections".into(),
        value,
        unit: "Count".into(),
        dimensions: vec![("Server".into(), "s1".into())],
        timestamp: Some(now),
    };
    cw.put_metric_data("Fluidity", &[datum(3.0), datum(4.0)])
        .expect("PutMetricData");
    let points = cw
        .get_metric_statistics(
            "Fluidity",
            "ActiveConnections",
            &[("Server", "s1")],
            now - Duration::from_secs(600),
            now + Duration::from_secs(600),
            Duration::from_secs(3600),
            &["Sum", "Maximum", "SampleCount"],
        )
        .expect("GetMetricStatistics");
    assert_eq!(points.len(), 1, "{points:?}");
    assert_eq!(points[0].sum, Some(7.0));
    assert_eq!(points[0].maximum, Some(4.0));
    assert_eq!(points[0].sample_count, Some(2.0));
    let other = cw
        .get_metric_statistics(
            "Fluidity",
            "ActiveConnections",
            &[("Server", "s2")],
            now - Duration::from_secs(600),
            now + Duration::from_secs(600),
            Duration::from_secs(3600),
            &["Sum"],
        )
        .expect("GetMetricStatistics");
    assert!(other.is_empty(), "another dimension has no data: {other:?}");
    let series = cw
        .get_metric_data(
            "Fluidity",
            "ActiveConnections",
            &[("Server", "s1")],
            now - Duration::from_secs(600),
            now + Duration::from_secs(600),
            Duration::from_secs(60),
            "Sum",
        )
        .expect("GetMetricData");
    assert_eq!(series.status, "Complete");
    let total: f64 = series.points.iter().map(|(_, v)| v).sum();
    assert_eq!(total, 7.0, "{series:?}");
    let idle = cw
        .get_metric_data(
            "Fluidity",
            "ActiveConnections",
            &[("Server", "s2")],
            now - Duration::from_secs(600),
            now + Duration::from_secs(600),
            Duration::from_secs(60),
            "Sum",
        )
        .expect("GetMetricData");
    assert!(idle.points.is_empty(), "{idle:?}");
}

#[test]
fn credentials_from_environment_variables() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let config = AwsConfig::from_env(&moto.env(&alice), &ChainOptions::default())
        .expect("configuration from the environment");
    assert_eq!(config.region, REGION);
    let creds = config.credentials.provide().expect("credentials");
    assert_eq!(creds.provider(), "environment");
    assert_eq!(whoami(&config), alice.arn);
}

#[test]
fn credentials_from_a_profile_in_shared_files() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let bob = moto.create_user("bob");
    let role = moto.create_role("from-profile", &bob.arn);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let credentials = dir.path().join("credentials");
    let config_file = dir.path().join("config");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n\n\
             [work]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            alice.access_key_id, alice.secret_access_key, bob.access_key_id, bob.secret_access_key
        ),
    )
    .expect("writing the credentials file");
    std::fs::write(
        &config_file,
        format!(
            "[default]\nregion = {REGION}\n\n[profile work]\nregion = {REGION}\n\n\
             [profile deploy]\nregion = {REGION}\nrole_arn = {}\nsource_profile = work\nrole_session_name = deployer\n",
            role.arn
        ),
    )
    .expect("writing the config file");
    let env_for = |profile: Option<&str>| {
        let mut env = Env::from_pairs([
            ("AWS_ENDPOINT_URL", moto.endpoint()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                credentials.display().to_string(),
            ),
            ("AWS_CONFIG_FILE", config_file.display().to_string()),
        ]);
        if let Some(p) = profile {
            env.set("AWS_PROFILE", p);
        }
        env
    };
    // No AWS_REGION: the region comes from the profile too.
    let default = AwsConfig::from_env(&env_for(None), &ChainOptions::default()).expect("config");
    assert_eq!(default.region, REGION);
    assert_eq!(
        default
            .credentials
            .provide()
            .expect("credentials")
            .provider(),
        "profile"
    );
    assert_eq!(whoami(&default), alice.arn);
    let work =
        AwsConfig::from_env(&env_for(Some("work")), &ChainOptions::default()).expect("config");
    assert_eq!(whoami(&work), bob.arn);
    let deploy =
        AwsConfig::from_env(&env_for(Some("deploy")), &ChainOptions::default()).expect("config");
    assert_eq!(whoami(&deploy), role.assumed_arn("deployer"));
    // An undefined profile has no region either: give one to reach the credentials.
    let with_region = ChainOptions {
        region: Some(REGION.into()),
        ..ChainOptions::default()
    };
    let missing = AwsConfig::from_env(&env_for(Some("nope")), &with_region)
        .expect("config")
        .credentials
        .provide()
        .expect_err("an undefined profile has no credentials");
    assert!(missing.to_string().contains("nope"), "{missing}");
}

#[test]
fn credentials_from_a_credential_process() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let role = moto.create_role("from-process", &alice.arn);
    let dir = tempfile::tempdir().expect("a temporary folder");
    // What `aws configure export-credentials --format process` prints for an SSO profile.
    let script = dir.path().join("export-credentials");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat <<'EOF'\n{{\"Version\": 1, \"AccessKeyId\": \"{}\", \
             \"SecretAccessKey\": \"{}\"}}\nEOF\n",
            alice.access_key_id, alice.secret_access_key
        ),
    )
    .expect("writing the script");
    let refusing = dir.path().join("expired-login");
    std::fs::write(
        &refusing,
        "#!/bin/sh\necho 'The SSO session has expired; run aws sso login' >&2\nexit 255\n",
    )
    .expect("writing the script");
    for s in [&script, &refusing] {
        std::fs::set_permissions(s, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("making the script executable");
    }
    let config_file = dir.path().join("config");
    std::fs::write(
        &config_file,
        format!(
            "[profile sso-export]\nregion = {REGION}\ncredential_process = {}\n\n\
             [profile deploy]\nregion = {REGION}\nrole_arn = {}\nsource_profile = sso-export\n\
             role_session_name = via-process\n\n\
             [profile expired]\nregion = {REGION}\ncredential_process = {}\n",
            script.display(),
            role.arn,
            refusing.display()
        ),
    )
    .expect("writing the config file");
    let env_for = |profile: &str| {
        Env::from_pairs([
            ("AWS_ENDPOINT_URL", moto.endpoint()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
            ("AWS_CONFIG_FILE", config_file.display().to_string()),
            ("AWS_PROFILE", profile.into()),
        ])
    };
    let config =
        AwsConfig::from_env(&env_for("sso-export"), &ChainOptions::default()).expect("config");
    let creds = config.credentials.provide().expect("credentials");
    assert_eq!(creds.provider(), "credential_process");
    assert_eq!(whoami(&config), alice.arn);
    let deploy = AwsConfig::from_env(&env_for("deploy"), &ChainOptions::default()).expect("config");
    assert_eq!(whoami(&deploy), role.assumed_arn("via-process"));
    let expired = AwsConfig::from_env(&env_for("expired"), &ChainOptions::default())
        .expect("config")
        .credentials
        .provide()
        .expect_err("a process that fails gives no credentials");
    let text = expired.to_string();
    assert!(
        text.contains("expired-login") && text.contains("run aws sso login"),
        "{text}"
    );
}

#[test]
fn credentials_from_a_container_credentials_endpoint() {
    let moto = Moto::start();
    let task_user = moto.create_user("task-bootstrap");
    let role = moto.create_role("fluidity-task", &task_user.arn);
    // What the ECS agent would serve: the task role's temporary credentials.
    let creds = StsClient::new(&moto.aws_config(&task_user))
        .assume_role(&role.arn, "ecs-task", None, None)
        .expect("AssumeRole");
    let expiry = aws_time(creds.expiry().expect("an expiry"));
    let body = json!({
        "AccessKeyId": creds.access_key_id(),
        "SecretAccessKey": creds.secret_access_key(),
        "Token": creds.session_token(),
        "Expiration": expiry,
        "RoleArn": role.arn,
    })
    .to_string();
    let token = "container-token-1234";
    let server = Scripted::start(Box::new(move |req: &Request| {
        if req.method != "GET" || req.path != "/v2/credentials/task" {
            return Reply::status(404, "not found");
        }
        if req.header("authorization") != Some(token) {
            return Reply::status(401, "bad token");
        }
        Reply::json(200, &body)
    }));
    let mut env = Env::from_pairs(moto.env_vars_without_keys());
    env.set(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        server.url("/v2/credentials/task"),
    );
    env.set("AWS_CONTAINER_AUTHORIZATION_TOKEN", token);
    let config = AwsConfig::from_env(&env, &ChainOptions::default()).expect("config");
    let got = config.credentials.provide().expect("container credentials");
    assert_eq!(got.provider(), "ecs-container");
    assert!(got.expiry().is_some());
    assert_eq!(whoami(&config), role.assumed_arn("ecs-task"));
    // Cached: a second call reuses the credentials instead of asking the endpoint again.
    let asked = server.requests();
    assert_eq!(whoami(&config), role.assumed_arn("ecs-task"));
    assert_eq!(server.requests(), asked);

    env.set("AWS_CONTAINER_AUTHORIZATION_TOKEN", "wrong-token");
    let err = ContainerProvider::new(&env, &HttpClient::direct().expect("client"))
        .provide()
        .expect_err("a wrong token is refused");
    assert_eq!(err.status(), Some(401), "{err}");
    assert!(
        !err.to_string().contains("wrong-token"),
        "no token in errors: {err}"
    );
}

#[test]
fn credentials_from_instance_metadata_with_imdsv2_tokens() {
    let moto = Moto::start();
    let boot = moto.create_user("instance-bootstrap");
    let role = moto.create_role("fluidity-instance", &boot.arn);
    let creds = StsClient::new(&moto.aws_config(&boot))
        .assume_role(&role.arn, "i-0123", None, None)
        .expect("AssumeRole");
    let body = json!({
        "Code": "Success",
        "Type": "AWS-HMAC",
        "AccessKeyId": creds.access_key_id(),
        "SecretAccessKey": creds.secret_access_key(),
        "Token": creds.session_token(),
        "Expiration": aws_time(creds.expiry().expect("an expiry")),
    })
    .to_string();
    const TOKEN: &str = "imds-session-token";
    let tokens_issued = Arc::new(AtomicUsize::new(0));
    let issued = Arc::clone(&tokens_issued);
    // IMDSv2 only: every GET must carry the session token from a PUT with a TTL.
    let server = Scripted::start(Box::new(move |req: &Request| {
        if req.method == "PUT" && req.path == "/latest/api/token" {
            return match req.header("x-aws-ec2-metadata-token-ttl-seconds") {
                Some(_) => {
                    issued.fetch_add(1, Ordering::SeqCst);
                    Reply::status(200, TOKEN)
                }
                None => Reply::status(400, "missing TTL"),
            };
        }
        if req.header("x-aws-ec2-metadata-token") != Some(TOKEN) {
            return Reply::status(401, "IMDSv2 token required");
        }
        match req.path.as_str() {
            "/latest/meta-data/iam/security-credentials/" => {
                Reply::status(200, "fluidity-instance")
            }
            "/latest/meta-data/iam/security-credentials/fluidity-instance" => {
                Reply::json(200, &body)
            }
            _ => Reply::status(404, "not found"),
        }
    }));
    let mut env = Env::from_pairs(moto.env_vars_without_keys());
    env.remove("AWS_EC2_METADATA_DISABLED");
    env.set("AWS_EC2_METADATA_SERVICE_ENDPOINT", server.url(""));
    let config = AwsConfig::from_env(&env, &ChainOptions::default()).expect("config");
    let got = config.credentials.provide().expect("instance credentials");
    assert_eq!(got.provider(), "imds");
    assert_eq!(whoami(&config), role.assumed_arn("i-0123"));
    assert_eq!(tokens_issued.load(Ordering::SeqCst), 1, "one token, reused");
}

#[test]
fn credentials_through_assume_role_on_top_of_the_chain() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let role = moto.create_role("fluidity-agent", &alice.arn);
    let options = ChainOptions {
        iam_role_arn: Some(role.arn.clone()),
        role_session_name: Some("agent".into()),
        ..ChainOptions::default()
    };
    let config = AwsConfig::from_env(&moto.env(&alice), &options).expect("config");
    let creds = config.credentials.provide().expect("assumed credentials");
    assert_eq!(creds.provider(), "assume-role");
    assert_eq!(whoami(&config), role.assumed_arn("agent"));

    // The same provider, built by hand over a source that cannot sign: the failure is
    // AssumeRole's, with the code moto gives.
    let bad = moto.aws_config(&alice.with_wrong_secret());
    let err = AssumeRoleProvider::new(bad, role.arn.clone(), None, None, None)
        .provide()
        .expect_err("a bad source signature fails AssumeRole");
    assert_eq!(err.code(), Some("SignatureDoesNotMatch"), "{err}");
}

#[test]
fn endpoint_overrides_per_service_win_over_the_global_one() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    // Nothing listens on the global endpoint's port: only STS is reachable.
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let env = moto
        .env(&alice)
        .with("AWS_ENDPOINT_URL", dead_url)
        .with("AWS_ENDPOINT_URL_STS", moto.endpoint());
    let config = AwsConfig::from_env(&env, &ChainOptions::default())
        .expect("config")
        .with_retry(RetryPolicy::none());
    assert_eq!(whoami(&config), alice.arn);
    let err = SecretsManagerClient::new(&config)
        .get_secret_value("x")
        .expect_err("nothing listens there");
    assert!(err.is_connection_refused(), "{err}");
}

#[test]
fn loopback_endpoints_bypass_a_configured_proxy() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    // A proxy nobody listens on: calls to moto on 127.0.0.1 must not try it.
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let env = moto.env(&alice).with("HTTPS_PROXY", proxy);
    let config = AwsConfig::from_env(&env, &ChainOptions::default())
        .expect("config")
        .with_retry(RetryPolicy::none());
    assert!(config.http.config().proxy.is_some());
    assert_eq!(whoami(&config), alice.arn);
}

#[test]
fn temporary_credentials_in_the_environment_carry_their_session_token() {
    let moto = Moto::start();
    let alice = moto.create_user("alice");
    let role = moto.create_role("env-role", &alice.arn);
    let creds = moto.assume_role(&alice, &role, "from-env");
    let env = Env::from_pairs(moto.env_vars_for(&creds));
    let config = AwsConfig::from_env(&env, &ChainOptions::default()).expect("config");
    assert_eq!(whoami(&config), role.assumed_arn("from-env"));
    // Without the token, the temporary key id alone is refused.
    let mut env = env;
    env.remove("AWS_SESSION_TOKEN");
    let config = AwsConfig::from_env(&env, &ChainOptions::default())
        .expect("config")
        .with_retry(RetryPolicy::none());
    let err = StsClient::new(&config)
        .get_caller_identity()
        .expect_err("a temporary key without its token");
    assert_eq!(err.status(), Some(403), "{err}");
}

// ---- transport behaviour, against local servers that misbehave on purpose ----

const CALLER_IDENTITY: &str =
    "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
<GetCallerIdentityResult><Arn>arn:aws:iam::123456789012:user/local</Arn><UserId>AIDLOCAL</UserId>\
<Account>123456789012</Account></GetCallerIdentityResult>\
<ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata></GetCallerIdentityResponse>";

fn fast_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: attempts,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    }
}

fn local_config(url: &str, http: HttpConfig) -> AwsConfig {
    AwsConfig::new(
        REGION,
        Arc::new(fluidity_aws::Credentials::new(
            "AKIDLOCAL",
            "local-secret",
            None,
            None,
            "test",
        )),
        Endpoints::global(url),
        HttpClient::new(http).expect("client"),
    )
}

/// A server that answers the scripted replies in turn, then the last one forever.
fn sequence(replies: Vec<Reply>) -> Scripted {
    let replies = Mutex::new(VecDeque::from(replies));
    Scripted::start(Box::new(move |_req: &Request| {
        let mut r = replies.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() > 1 {
            r.pop_front().unwrap_or_else(|| Reply::status(500, "empty"))
        } else {
            r.front()
                .cloned()
                .unwrap_or_else(|| Reply::status(500, "empty"))
        }
    }))
}

#[test]
fn server_errors_are_retried_then_succeed() {
    let server = sequence(vec![
        Reply::xml(500, "<ErrorResponse><Error><Code>InternalError</Code><Message>boom</Message></Error></ErrorResponse>"),
        Reply::status(503, ""),
        Reply::xml(200, CALLER_IDENTITY),
    ]);
    let config = local_config(&server.url(""), HttpConfig::default()).with_retry(fast_retries(3));
    assert_eq!(whoami(&config), "arn:aws:iam::123456789012:user/local");
    assert_eq!(server.requests(), 3);
}

#[test]
fn throttling_is_retried_then_succeeds() {
    let server = sequence(vec![
        Reply::xml(400, "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error></ErrorResponse>"),
        Reply::json(400, r#"{"__type":"ThrottlingException","message":"slow down"}"#),
        Reply::xml(200, CALLER_IDENTITY),
    ]);
    let config = local_config(&server.url(""), HttpConfig::default()).with_retry(fast_retries(5));
    assert_eq!(whoami(&config), "arn:aws:iam::123456789012:user/local");
    assert_eq!(server.requests(), 3);
}

#[test]
fn retries_stop_at_the_limit_and_client_errors_are_not_retried() {
    let server = sequence(vec![Reply::status(500, "always broken")]);
    let config = local_config(&server.url(""), HttpConfig::default()).with_retry(fast_retries(3));
    let err = StsClient::new(&config)
        .get_caller_identity()
        .expect_err("always 500");
    assert_eq!(err.status(), Some(500), "{err}");
    assert_eq!(server.requests(), 3);

    let server = sequence(vec![Reply::xml(
        400,
        "<ErrorResponse><Error><Code>ValidationError</Code><Message>bad</Message></Error></ErrorResponse>",
    )]);
    let config = local_config(&server.url(""), HttpConfig::default()).with_retry(fast_retries(3));
    let err = StsClient::new(&config)
        .get_caller_identity()
        .expect_err("a client error");
    assert_eq!(err.code(), Some("ValidationError"), "{err}");
    assert_eq!(server.requests(), 1);
}

#[test]
fn an_endpoint_that_never_answers_times_out() {
    // Accepts connections (the kernel does, from the backlog) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("addr"));
    let http = HttpConfig {
        call_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    };
    let config = local_config(&url, http).with_retry(fast_retries(2));
    let err = StsClient::new(&config)
        .get_caller_identity()
        .expect_err("no answer");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    drop(silent);
}

#[test]
fn lambda_function_url_calls_are_signed_for_lambda() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = Arc::clone(&seen);
    let server = Scripted::start(Box::new(move |req: &Request| {
        let problems = check_lambda_signature(req);
        let mut log = record.lock().unwrap_or_else(|e| e.into_inner());
        log.extend(problems.iter().cloned());
        if problems.is_empty() {
            Reply::json(200, r#"{"status":"waking","server_arn":"arn:aws:ecs:x"}"#)
        } else {
            Reply::status(403, &problems.join("; "))
        }
    }));
    let config = local_config(&server.url(""), HttpConfig::default());
    let client = FunctionUrlClient::new(&config);
    let out = client
        .post_json(&server.url("/wake"), &json!({ "action": "wake" }))
        .expect("the signed call is accepted");
    assert_eq!(out["status"], "waking");
    assert!(
        seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty(),
        "{seen:?}"
    );
    assert_eq!(server.requests(), 1);

    // An error status comes back as HttpStatus and is not retried (a POST may have run).
    let failing = sequence(vec![Reply::status(502, "bad gateway")]);
    let err = FunctionUrlClient::new(&config.clone().with_retry(fast_retries(3)))
        .post_json(&failing.url("/kill"), &json!({}))
        .expect_err("502");
    assert_eq!(err.status(), Some(502), "{err}");
    assert_eq!(failing.requests(), 1);
}

/// What a function URL under AWS_IAM auth needs from the request: a SigV4 Authorization
/// for service `lambda` that signs host and x-amz-content-sha256, and that header equal to
/// the body's hash. Returns the problems found.
fn check_lambda_signature(req: &Request) -> Vec<String> {
    let mut problems = Vec::new();
    let auth = req.header("authorization").unwrap_or_default();
    if !auth.starts_with("AWS4-HMAC-SHA256 ") {
        problems.push(format!("not SigV4: {auth:?}"));
    }
    let scope_ok = auth
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split(',').next())
        .is_some_and(|c| {
            let parts: Vec<&str> = c.split('/').collect();
            parts.len() == 5
                && parts[0] == "AKIDLOCAL"
                && parts[2] == REGION
                && parts[3] == "lambda"
                && parts[4] == "aws4_request"
        });
    if !scope_ok {
        problems.push(format!("credential scope is not lambda in {REGION}"));
    }
    let signed = auth
        .split("SignedHeaders=")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_default();
    for h in ["host", "x-amz-content-sha256", "x-amz-date"] {
        if !signed.split(';').any(|s| s == h) {
            problems.push(format!("{h} not signed ({signed})"));
        }
    }
    if !auth.contains("Signature=") {
        problems.push("no signature".into());
    }
    if req.header("x-amz-content-sha256") != Some(sha256_hex(&req.body).as_str()) {
        problems.push("x-amz-content-sha256 does not match the body".into());
    }
    if req.method != "POST" {
        problems.push(format!("method {}", req.method));
    }
    problems
}

/// `2024-01-02T03:04:05Z`, as the credential endpoints write expiry times.
fn aws_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date dependency here.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---- a tiny scripted HTTP/1.1 server on 127.0.0.1 ----

/// A request as the scripted server read it.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One scripted answer.
#[derive(Clone)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn status(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            body: body.to_string(),
        }
    }
    fn json(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: body.to_string(),
        }
    }
    fn xml(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/xml",
            body: body.to_string(),
        }
    }
}

type Handler = Box<dyn Fn(&Request) -> Reply + Send + Sync>;

/// Serves each connection on its own thread until the test ends (the threads die with the
/// test process); counts the requests it answered.
struct Scripted {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Scripted {
    fn start(handler: Handler) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let count = Arc::clone(&requests);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let handler = Arc::clone(&handler);
                let count = Arc::clone(&count);
                std::thread::spawn(move || {
                    let _ = serve(conn, &handler, &count);
                });
            }
        });
        Scripted { addr, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn serve(conn: TcpStream, handler: &Handler, count: &AtomicUsize) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len.min(1 << 20)];
        reader.read_exact(&mut body)?;
        let req = Request {
            method,
            path,
            headers,
            body,
        };
        let reply = handler(&req);
        count.fetch_add(1, Ordering::SeqCst);
        write!(
            conn,
            "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n{}",
            reply.status,
            reply.content_type,
            reply.body.len(),
            reply.body
        )?;
        conn.flush()?;
    }
}
