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

/// Stores `agent_ip` for `id`, valid for `ttl` from `now` (replacing any earlier item).
pub fn put_agent_ip(
    ddb: &DynamoDbClient,
    table: &str,
    id: &ServerId,
    agent_ip: IpAddr,
    now: SystemTime,
    ttl: Duration,
) -> Result<()> {
    let mut item = key(id);
    item.insert(AGENT_IP_ATTR.into(), attr_s(agent_ip.to_string()));
    item.insert(UPDATED_AT_ATTR.into(), attr_n(epoch_secs(now)));
    item.insert(TTL_ATTR.into(), attr_n(epoch_secs(now + ttl)));
    ddb.put_item(table, &item)
}

/// Reads the record of `id`, expired or not (strongly consistent, so a server started
/// right after Wake sees what Wake wrote). `None` when there is none.
pub fn read_agent_ip(
    ddb: &DynamoDbClient,
    table: &str,
    id: &ServerId,
) -> Result<Option<AgentIpRecord>> {
    let Some(item) = ddb.get_item(table, &key(id), true)? else {
        return Ok(None);
    };
    let bad = |what: &str| Error::MalformedResponse {
        service: "dynamodb",
        operation: "GetItem".into(),
        message: format!("item {} of table {table}: {what}", id.key()),
    };
    let agent_ip = get_s(&item, AGENT_IP_ATTR)
        .and_then(|s| s.parse::<IpAddr>().ok())
        .ok_or_else(|| bad("agent_ip is missing or not an IP address"))?;
    let at = |name: &str| {
        get_n(&item, name)
            .and_then(|n| u64::try_from(n).ok())
            .and_then(|n| UNIX_EPOCH.checked_add(Duration::from_secs(n)))
            .ok_or_else(|| bad(&format!("{name} is missing or not a time")))
    };
    Ok(Some(AgentIpRecord {
        agent_ip,
        updated_at: at(UPDATED_AT_ATTR)?,
        expires_at: at(TTL_ATTR)?,
    }))
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
