//! The agent's public IP, as Wake stored it in DynamoDB under the server's
//! `CLUSTER/SERVICE` key.
//!
//! The server starts because an agent called Wake, which wrote the item before it raised
//! the desired count, so the item is normally there at once; it is still read with
//! retries and capped exponential backoff because DynamoDB may throttle, a read may race
//! a replacement write, and a server started by hand may come up before any agent woke it.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use fluidity_aws::clients::dynamodb::DynamoDbClient;
pub use fluidity_aws::control::agent_ip::live_agent_ip;
use fluidity_aws::control::ServerId;

use crate::Error;

/// Reads the agent's IP, retrying a missing item and retryable failures with capped
/// exponential backoff (from `first_delay`, doubling up to 15 s) until `limit` has passed.
pub fn wait_for_agent_ip(
    ddb: &DynamoDbClient,
    table: &str,
    id: &ServerId,
    limit: Duration,
    first_delay: Duration,
) -> Result<IpAddr, Error> {
    let started = Instant::now();
    let mut delay = first_delay;
    loop {
        let why = match live_agent_ip(ddb, table, id, SystemTime::now()) {
            Ok(Some(record)) => {
                let ip = record.agent_ip;
                tracing::info!(server = %id, agent_ip = %ip, "agent address read from DynamoDB");
                return Ok(ip);
            }
            // An expired item is as good as none: the agent that wrote it is long gone.
            Ok(None) => format!("no unexpired item for {id}"),
            Err(e) if e.is_retryable() => e.to_string(),
            Err(e) => {
                return Err(Error::AwsStartup(format!(
                    "cannot read the agent address for {id} from DynamoDB table {table}: {e}"
                )))
            }
        };
        let waited = started.elapsed();
        if waited + delay > limit {
            return Err(Error::AwsStartup(format!(
                "no agent address for {id} in DynamoDB table {table} after {}s: {why}; \
                 the agent calls Wake before the server starts",
                waited.as_secs()
            )));
        }
        tracing::info!(server = %id, reason = %why, retry_in_ms = delay.as_millis() as u64,
            "waiting for the agent's address");
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(15));
    }
}
