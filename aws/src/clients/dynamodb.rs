//! DynamoDB: PutItem, GetItem, UpdateTimeToLive. Items are DynamoDB-JSON maps
//! (`{"pk": {"S": "…"}, "ttl": {"N": "…"}}`).

use serde_json::{json, Map, Value};

use crate::client::AwsConfig;
use crate::clients::malformed;
use crate::endpoints::Service;
use crate::error::Result;

/// An item: attribute name → DynamoDB attribute value.
pub type Item = Map<String, Value>;

/// A string attribute value (`{"S": s}`).
pub fn attr_s(s: impl Into<String>) -> Value {
    json!({ "S": s.into() })
}

/// A number attribute value (`{"N": "n"}`).
pub fn attr_n(n: impl std::fmt::Display) -> Value {
    json!({ "N": n.to_string() })
}

/// The string in a `{"S": …}` attribute of `item`.
pub fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)?.get("S")?.as_str()
}

/// The number in a `{"N": …}` attribute of `item`.
pub fn get_n(item: &Item, name: &str) -> Option<i64> {
    item.get(name)?.get("N")?.as_str()?.parse().ok()
}

/// The DynamoDB client.
#[derive(Clone, Debug)]
pub struct DynamoDbClient {
    config: AwsConfig,
}

impl DynamoDbClient {
    /// A client using `config`.
    pub fn new(config: &AwsConfig) -> Self {
        DynamoDbClient {
            config: config.clone(),
        }
    }

    /// PutItem (replaces any item with the same key).
    pub fn put_item(&self, table: &str, item: &Item) -> Result<()> {
        self.config.call_json(
            Service::DynamoDb,
            "PutItem",
            &json!({ "TableName": table, "Item": item }),
        )?;
        Ok(())
    }

    /// GetItem; `None` when there is no item with that key.
    pub fn get_item(&self, table: &str, key: &Item, consistent_read: bool) -> Result<Option<Item>> {
        let out = self.config.call_json(
            Service::DynamoDb,
            "GetItem",
            &json!({ "TableName": table, "Key": key, "ConsistentRead": consistent_read }),
        )?;
        get_item_answer(out)
    }

    /// UpdateTimeToLive: enables or disables expiry on `attribute` (epoch seconds).
    /// Expired items may linger for days (and forever under moto): filter on read.
    pub fn update_time_to_live(&self, table: &str, attribute: &str, enabled: bool) -> Result<()> {
        self.config.call_json(
            Service::DynamoDb,
            "UpdateTimeToLive",
            &json!({
                "TableName": table,
                "TimeToLiveSpecification": { "AttributeName": attribute, "Enabled": enabled },
            }),
        )?;
        Ok(())
    }
}

/// The item of a GetItem answer; `None` when the answer has none.
pub(crate) fn get_item_answer(mut out: Value) -> Result<Option<Item>> {
    match out.get_mut("Item").map(Value::take) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(malformed("dynamodb", "GetItem", "Item is not an object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_item_answers() {
        assert_eq!(get_item_answer(json!({})).unwrap(), None);
        assert_eq!(get_item_answer(json!({ "Item": null })).unwrap(), None);
        let item = get_item_answer(json!({ "Item": { "n": { "N": "-5" }, "s": { "S": "x" } } }))
            .unwrap()
            .unwrap();
        assert_eq!(
            (get_n(&item, "n"), get_s(&item, "s")),
            (Some(-5), Some("x"))
        );
        assert_eq!((get_n(&item, "s"), get_s(&item, "n")), (None, None));
        assert!(get_item_answer(json!({ "Item": [] })).is_err());
        let huge = item_of(json!({ "n": { "N": "1".repeat(40) } }));
        assert_eq!(get_n(&huge, "n"), None);
    }

    fn item_of(v: Value) -> Item {
        v.as_object().unwrap().clone()
    }
}
