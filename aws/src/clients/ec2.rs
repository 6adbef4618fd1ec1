//! EC2: DescribeNetworkInterfaces.

use crate::client::AwsConfig;
use crate::endpoints::Service;
use crate::error::Result;

/// The parts of a network interface Fluidity reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkInterface {
    /// `eni-…`.
    pub id: String,
    /// `available`, `in-use`, …
    pub status: String,
    /// The primary private IPv4 address.
    pub private_ip: Option<String>,
    /// The public IPv4 address associated with it, if any.
    pub public_ip: Option<String>,
    /// The subnet.
    pub subnet_id: Option<String>,
    /// The VPC.
    pub vpc_id: Option<String>,
}

/// The EC2 client.
#[derive(Clone, Debug)]
pub struct Ec2Client {
    config: AwsConfig,
}

impl Ec2Client {
    /// A client using `config`.
    pub fn new(config: &AwsConfig) -> Self {
        Ec2Client {
            config: config.clone(),
        }
    }

    /// DescribeNetworkInterfaces for these ids.
    pub fn describe_network_interfaces(&self, ids: &[&str]) -> Result<Vec<NetworkInterface>> {
        let keys: Vec<String> = (1..=ids.len())
            .map(|i| format!("NetworkInterfaceId.{i}"))
            .collect();
        let params: Vec<(&str, &str)> = keys
            .iter()
            .map(String::as_str)
            .zip(ids.iter().copied())
            .collect();
        let root = self
            .config
            .call_query(Service::Ec2, "DescribeNetworkInterfaces", &params)?;
        Ok(network_interfaces(&root))
    }
}

/// The interfaces of a DescribeNetworkInterfaces answer.
pub(crate) fn network_interfaces(root: &crate::xml::XmlNode) -> Vec<NetworkInterface> {
    let text = |n: &crate::xml::XmlNode, path: &[&str]| {
        n.text_at(path)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    root.items("networkInterfaceSet")
        .map(|n| NetworkInterface {
            id: text(n, &["networkInterfaceId"]).unwrap_or_default(),
            status: text(n, &["status"]).unwrap_or_default(),
            private_ip: text(n, &["privateIpAddress"]),
            public_ip: text(n, &["association", "publicIp"]),
            subnet_id: text(n, &["subnetId"]),
            vpc_id: text(n, &["vpcId"]),
        })
        .collect()
}
