//! The agent-IP table: Wake writes the caller's address under the server identity
//! ([`ServerId::key`]), and the server and Query read it back.
//!
//! Item: `server_id` (S, partition key) = `CLUSTER/SERVICE`, `agent_ip` (S),
//! `updated_at` (N, epoch seconds), `ttl` (N, epoch seconds, `updated_at` + one hour).
//! DynamoDB deletes expired items only eventually (moto never), so readers check `ttl`.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::types::{ServerId, AGENT_IP_ATTR, SERVER_ID_ATTR, TTL_ATTR, UPDATED_AT_ATTR};
use crate::clients::dynamodb::{attr_n, attr_s, get_n, get_s, DynamoDbClient, Item};
use crate::error::{Error, Result};

/// An agent IP as stored by Wake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIpRecord {
    /// The agent's public IP as Wake saw it.
    pub agent_ip: IpAddr,
    /// When Wake stored it (the last wake).
    pub updated_at: SystemTime,
    /// When it stops being valid.
    pub expires_at: SystemTime,
}

impl AgentIpRecord {
    /// Whether the record is past its TTL at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.expires_at
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn key(id: &ServerId) -> Item {
    let mut k = Item::new();
    k.insert(SERVER_ID_ATTR.into(), attr_s(id.key()));
    k
}

/// The item that stores `record` under `id`. Times are whole epoch seconds (earlier
/// than the epoch is stored as 0).
pub(crate) fn agent_ip_item(id: &ServerId, record: &AgentIpRecord) -> Item {
    let mut item = key(id);
    item.insert(AGENT_IP_ATTR.into(), attr_s(record.agent_ip.to_string()));
    item.insert(
        UPDATED_AT_ATTR.into(),
        attr_n(epoch_secs(record.updated_at)),
    );
    item.insert(TTL_ATTR.into(), attr_n(epoch_secs(record.expires_at)));
    item
}

/// Stores `agent_ip` for `id`, valid for `ttl` from `now` (replacing any earlier item).
pub fn put_agent_ip(
    ddb: &DynamoDbClient,
    table: &str,
    id: &ServerId,
    agent_ip: IpAddr,
    now: SystemTime,
    ttl: Duration,
) -> Result<()> {
    let record = AgentIpRecord {
        agent_ip,
        updated_at: now,
        expires_at: now + ttl,
    };
    ddb.put_item(table, &agent_ip_item(id, &record))
}

/// Reads the record of `id`, expired or not (strongly consistent, so a server started
/// right after Wake sees what Wake wrote). `None` when there is none.
pub fn read_agent_ip(
    ddb: &DynamoDbClient,
    table: &str,
    id: &ServerId,
) -> Result<Option<AgentIpRecord>> {
    ddb.get_item(table, &key(id), true)?
        .map(|item| agent_ip_record(&item, table, id))
        .transpose()
}

/// The record in an item of the agent-IP table (`table`, under `id`, which errors name):
/// an IP address and two times in epoch seconds that a [`SystemTime`] can hold.
pub(crate) fn agent_ip_record(item: &Item, table: &str, id: &ServerId) -> Result<AgentIpRecord> {
    let bad = |what: &str| Error::MalformedResponse {
        service: "dynamodb",
        operation: "GetItem".into(),
        message: format!("item {} of table {table}: {what}", id.key()),
    };
    let agent_ip = get_s(item, AGENT_IP_ATTR)
        .and_then(|s| s.parse::<IpAddr>().ok())
        .ok_or_else(|| bad("agent_ip is missing or not an IP address"))?;
    let at = |name: &str| {
        get_n(item, name)
            .and_then(|n| u64::try_from(n).ok())
            .and_then(|n| UNIX_EPOCH.checked_add(Duration::from_secs(n)))
            .ok_or_else(|| bad(&format!("{name} is missing or not a time")))
    };
    Ok(AgentIpRecord {
        agent_ip,
        updated_at: at(UPDATED_AT_ATTR)?,
        expires_at: at(TTL_ATTR)?,
    })
}

/// The unexpired record of `id` at `now`: what the server uses at start-up.
pub fn live_agent_ip(
    ddb: &DynamoDbClient,
    table: &str,
    id: &ServerId,
    now: SystemTime,
) -> Result<Option<AgentIpRecord>> {
    Ok(read_agent_ip(ddb, table, id)?.filter(|r| !r.is_expired(now)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn item(v: serde_json::Value) -> Item {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn records_read_back_as_written() {
        let id = ServerId::new("c", "s");
        let record = AgentIpRecord {
            agent_ip: "2001:db8::9".parse().unwrap(),
            updated_at: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
            expires_at: UNIX_EPOCH + Duration::from_secs(1_767_229_200),
        };
        let written = agent_ip_item(&id, &record);
        assert_eq!(get_s(&written, SERVER_ID_ATTR), Some("c/s"));
        assert_eq!(agent_ip_record(&written, "t", &id).unwrap(), record);
    }

    #[test]
    fn records_with_unreadable_times_or_addresses_are_refused() {
        let id = ServerId::new("c", "s");
        for (v, why) in [
            (json!({}), "agent_ip is missing"),
            (json!({ "agent_ip": { "S": "host" } }), "not an IP"),
            (json!({ "agent_ip": { "N": "1" } }), "not an IP"),
            (
                json!({ "agent_ip": { "S": "10.0.0.1" }, "updated_at": { "N": "-1" }, "ttl": { "N": "1" } }),
                "updated_at is missing or not a time",
            ),
            (
                json!({ "agent_ip": { "S": "10.0.0.1" }, "updated_at": { "N": "1" }, "ttl": { "N": "1e3" } }),
                "ttl is missing",
            ),
            // Past i64.
            (
                json!({ "agent_ip": { "S": "10.0.0.1" }, "updated_at": { "N": "1" }, "ttl": { "N": "99999999999999999999999" } }),
                "ttl is missing",
            ),
        ] {
            let e = agent_ip_record(&item(v), "t", &id).unwrap_err().to_string();
            assert!(e.contains("item c/s of table t") && e.contains(why), "{e}");
        }
    }
}
