//! Services and their endpoints, with overrides for moto, VPC endpoints and other partitions.

use std::collections::BTreeMap;

use crate::env::Env;
use crate::error::{Error, Result};

/// An AWS service this crate talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Service {
    /// Security Token Service.
    Sts,
    /// Elastic Container Service.
    Ecs,
    /// Elastic Compute Cloud.
    Ec2,
    /// DynamoDB.
    DynamoDb,
    /// Secrets Manager.
    SecretsManager,
    /// CloudWatch (metrics).
    CloudWatch,
    /// Lambda (function URLs).
    Lambda,
    /// Identity and Access Management.
    Iam,
}

impl Service {
    /// Every service, for iteration.
    pub const ALL: [Service; 8] = [
        Service::Sts,
        Service::Ecs,
        Service::Ec2,
        Service::DynamoDb,
        Service::SecretsManager,
        Service::CloudWatch,
        Service::Lambda,
        Service::Iam,
    ];

    /// The SigV4 signing name.
    pub fn signing_name(self) -> &'static str {
        match self {
            Service::Sts => "sts",
            Service::Ecs => "ecs",
            Service::Ec2 => "ec2",
            Service::DynamoDb => "dynamodb",
            Service::SecretsManager => "secretsmanager",
            Service::CloudWatch => "monitoring",
            Service::Lambda => "lambda",
            Service::Iam => "iam",
        }
    }

    /// The suffix of the `AWS_ENDPOINT_URL_<SERVICE>` variable (the SDKs' service id,
    /// upper-cased, spaces as underscores).
    pub fn env_suffix(self) -> &'static str {
        match self {
            Service::Sts => "STS",
            Service::Ecs => "ECS",
            Service::Ec2 => "EC2",
            Service::DynamoDb => "DYNAMODB",
            Service::SecretsManager => "SECRETS_MANAGER",
            Service::CloudWatch => "CLOUDWATCH",
            Service::Lambda => "LAMBDA",
            Service::Iam => "IAM",
        }
    }

    /// The name used in configuration files (`[endpoints]` keys), lower case.
    pub fn config_key(self) -> &'static str {
        match self {
            Service::Sts => "sts",
            Service::Ecs => "ecs",
            Service::Ec2 => "ec2",
            Service::DynamoDb => "dynamodb",
            Service::SecretsManager => "secretsmanager",
            Service::CloudWatch => "cloudwatch",
            Service::Lambda => "lambda",
            Service::Iam => "iam",
        }
    }

    /// Parses a [`Service::config_key`] (case-insensitive; `monitoring` and
    /// `secrets_manager` accepted too).
    pub fn from_config_key(key: &str) -> Option<Service> {
        let key = key.to_ascii_lowercase().replace(['-', '_'], "");
        Service::ALL
            .into_iter()
            .find(|s| s.config_key() == key || s.signing_name() == key)
    }

    /// Whether the service has one global endpoint rather than one per region.
    fn is_global(self) -> bool {
        self == Service::Iam
    }
}

/// An AWS partition: a group of regions with its own DNS suffix, ARNs and global
/// endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Partition {
    /// The commercial regions.
    Aws,
    /// China (`cn-*`).
    AwsCn,
    /// GovCloud (`us-gov-*`).
    AwsUsGov,
    /// US ISO (`us-iso-*`).
    AwsIso,
    /// US ISOB (`us-isob-*`).
    AwsIsoB,
    /// EU ISOE (`eu-isoe-*`).
    AwsIsoE,
    /// US ISOF (`us-isof-*`).
    AwsIsoF,
    /// European Sovereign Cloud (`eusc-*`).
    AwsEusc,
}

impl Partition {
    /// The partition `region` belongs to, by its prefix as the SDKs' partition table
    /// matches it; any other region is in `aws`.
    pub fn of(region: &str) -> Partition {
        // Longer prefixes first: `us-isob-` also starts with `us-iso`.
        const PREFIXES: [(&str, Partition); 7] = [
            ("cn-", Partition::AwsCn),
            ("us-gov-", Partition::AwsUsGov),
            ("us-isob-", Partition::AwsIsoB),
            ("us-isof-", Partition::AwsIsoF),
            ("us-iso-", Partition::AwsIso),
            ("eu-isoe-", Partition::AwsIsoE),
            ("eusc-", Partition::AwsEusc),
        ];
        PREFIXES
            .into_iter()
            .find(|(prefix, _)| region.starts_with(prefix))
            .map_or(Partition::Aws, |(_, p)| p)
    }

    /// The name used in ARNs (`arn:<name>:...`).
    pub fn name(self) -> &'static str {
        match self {
            Partition::Aws => "aws",
            Partition::AwsCn => "aws-cn",
            Partition::AwsUsGov => "aws-us-gov",
            Partition::AwsIso => "aws-iso",
            Partition::AwsIsoB => "aws-iso-b",
            Partition::AwsIsoE => "aws-iso-e",
            Partition::AwsIsoF => "aws-iso-f",
            Partition::AwsEusc => "aws-eusc",
        }
    }

    /// The DNS suffix of its endpoints.
    pub fn dns_suffix(self) -> &'static str {
        match self {
            Partition::Aws | Partition::AwsUsGov => "amazonaws.com",
            Partition::AwsCn => "amazonaws.com.cn",
            Partition::AwsIso => "c2s.ic.gov",
            Partition::AwsIsoB => "sc2s.sgov.gov",
            Partition::AwsIsoE => "cloud.adc-e.uk",
            Partition::AwsIsoF => "csp.hci.ic.gov",
            Partition::AwsEusc => "amazonaws.eu",
        }
    }

    /// The region its global services (IAM) are signed for.
    pub fn global_signing_region(self) -> &'static str {
        match self {
            Partition::Aws => "us-east-1",
            Partition::AwsCn => "cn-north-1",
            Partition::AwsUsGov => "us-gov-west-1",
            Partition::AwsIso => "us-iso-east-1",
            Partition::AwsIsoB => "us-isob-east-1",
            Partition::AwsIsoE => "eu-isoe-west-1",
            Partition::AwsIsoF => "us-isof-south-1",
            Partition::AwsEusc => "eusc-de-east-1",
        }
    }

    /// The public endpoint of global service `service` (IAM) in this partition.
    fn global_endpoint(self, service: Service) -> String {
        let (name, suffix) = (service.signing_name(), self.dns_suffix());
        match self {
            Partition::Aws => format!("https://{name}.{suffix}"),
            Partition::AwsUsGov => format!("https://{name}.us-gov.{suffix}"),
            _ => format!("https://{name}.{}.{suffix}", self.global_signing_region()),
        }
    }
}

/// Endpoint overrides: one URL for every service and per-service URLs.
///
/// Resolution order for a service: this set's per-service override, this set's global
/// override, then the layer below (see [`Endpoints::over`]), then the public AWS endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// A URL used for every service without its own override (e.g. moto's).
    pub global: Option<String>,
    /// Per-service URLs.
    pub services: BTreeMap<Service, String>,
    below: Option<Box<Endpoints>>,
}

impl Endpoints {
    /// No overrides: the public AWS endpoints.
    pub fn none() -> Self {
        Endpoints::default()
    }

    /// Every service at `url`.
    pub fn global(url: impl Into<String>) -> Self {
        Endpoints {
            global: Some(url.into()),
            ..Endpoints::default()
        }
    }

    /// Returns a copy with `service` at `url`.
    pub fn with_service(mut self, service: Service, url: impl Into<String>) -> Self {
        self.services.insert(service, url.into());
        self
    }

    /// The overrides the SDKs read from the environment: `AWS_ENDPOINT_URL` and
    /// `AWS_ENDPOINT_URL_<SERVICE>`, all ignored when `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`
    /// is true.
    pub fn from_env(env: &Env) -> Self {
        if env.is_true("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") {
            return Endpoints::none();
        }
        let mut e = Endpoints {
            global: env.get("AWS_ENDPOINT_URL").map(str::to_string),
            ..Endpoints::default()
        };
        for s in Service::ALL {
            if let Some(url) = env.get(&format!("AWS_ENDPOINT_URL_{}", s.env_suffix())) {
                e.services.insert(s, url.to_string());
            }
        }
        e
    }

    /// Layers `self` over `below`: entries of `self` win, `below` fills the gaps. Explicit
    /// configuration goes over [`Endpoints::from_env`], as in the SDKs.
    pub fn over(mut self, below: Endpoints) -> Self {
        self.below = Some(Box::new(match self.below.take() {
            Some(mine) => mine.over(below),
            None => below,
        }));
        self
    }

    fn lookup(&self, service: Service) -> Option<&str> {
        self.services
            .get(&service)
            .or(self.global.as_ref())
            .map(String::as_str)
            .or_else(|| self.below.as_ref().and_then(|b| b.lookup(service)))
    }

    /// Whether `service` has an override (and so is not the public AWS endpoint).
    pub fn is_overridden(&self, service: Service) -> bool {
        self.lookup(service).is_some()
    }

    /// The base URL of `service` in `region`, without a trailing slash.
    pub fn resolve(&self, service: Service, region: &str) -> Result<String> {
        let url = match self.lookup(service) {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                if region.is_empty()
                    || !region
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(Error::Config(format!("invalid region {region:?}")));
                }
                let partition = Partition::of(region);
                if service.is_global() {
                    partition.global_endpoint(service)
                } else {
                    format!(
                        "https://{}.{region}.{}",
                        service.signing_name(),
                        partition.dns_suffix()
                    )
                }
            }
        };
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(Error::Config(format!(
                "endpoint for {} must be an http(s) URL, got {url:?}",
                service.signing_name()
            )));
        }
        crate::sign::host_header(&url)?;
        Ok(url)
    }

    /// The region `service` is signed for: the configured one, except for global services
    /// at their public endpoint.
    pub fn signing_region<'a>(&self, service: Service, region: &'a str) -> &'a str {
        if service.is_global() && !self.is_overridden(service) {
            Partition::of(region).global_signing_region()
        } else {
            region
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_endpoints_follow_the_partition() {
        let e = Endpoints::none();
        assert_eq!(
            e.resolve(Service::Sts, "eu-west-1").unwrap(),
            "https://sts.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            e.resolve(Service::CloudWatch, "cn-north-1").unwrap(),
            "https://monitoring.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            e.resolve(Service::Iam, "eu-west-1").unwrap(),
            "https://iam.amazonaws.com"
        );
        assert_eq!(e.signing_region(Service::Iam, "eu-west-1"), "us-east-1");
        assert_eq!(
            e.resolve(Service::Iam, "cn-northwest-1").unwrap(),
            "https://iam.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            e.resolve(Service::Iam, "us-gov-east-1").unwrap(),
            "https://iam.us-gov.amazonaws.com"
        );
        assert_eq!(
            e.signing_region(Service::Iam, "us-gov-east-1"),
            "us-gov-west-1"
        );
        assert_eq!(
            e.resolve(Service::Ecs, "us-isob-east-1").unwrap(),
            "https://ecs.us-isob-east-1.sc2s.sgov.gov"
        );
        assert_eq!(
            e.resolve(Service::Iam, "us-iso-west-1").unwrap(),
            "https://iam.us-iso-east-1.c2s.ic.gov"
        );
        assert_eq!(
            e.signing_region(Service::Iam, "us-iso-west-1"),
            "us-iso-east-1"
        );
        assert_eq!(
            e.resolve(Service::Sts, "eusc-de-east-1").unwrap(),
            "https://sts.eusc-de-east-1.amazonaws.eu"
        );
        assert!(e.resolve(Service::Sts, "eu/west").is_err());
    }

    #[test]
    fn regions_fall_in_their_partitions() {
        for (region, name) in [
            ("eu-west-1", "aws"),
            ("us-east-1", "aws"),
            ("cn-north-1", "aws-cn"),
            ("us-gov-west-1", "aws-us-gov"),
            ("us-iso-east-1", "aws-iso"),
            ("us-isob-east-1", "aws-iso-b"),
            ("us-isof-south-1", "aws-iso-f"),
            ("eu-isoe-west-1", "aws-iso-e"),
            ("eusc-de-east-1", "aws-eusc"),
        ] {
            assert_eq!(Partition::of(region).name(), name, "{region}");
        }
    }

    #[test]
    fn explicit_overrides_beat_the_environment() {
        let env = Env::from_pairs([
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:2/"),
            ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "http://127.0.0.1:3"),
        ]);
        let from_env = Endpoints::from_env(&env);
        assert_eq!(
            from_env.resolve(Service::Ecs, "x").unwrap(),
            "http://127.0.0.1:1"
        );
        assert_eq!(
            from_env.resolve(Service::DynamoDb, "x").unwrap(),
            "http://127.0.0.1:2"
        );
        let layered = Endpoints::none()
            .with_service(Service::SecretsManager, "https://vpce.example")
            .over(from_env);
        assert_eq!(
            layered.resolve(Service::SecretsManager, "x").unwrap(),
            "https://vpce.example"
        );
        assert_eq!(
            layered.resolve(Service::Ecs, "x").unwrap(),
            "http://127.0.0.1:1"
        );
        let ignored = Endpoints::from_env(&env.with("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true"));
        assert!(!ignored.is_overridden(Service::Ecs));
    }
}
