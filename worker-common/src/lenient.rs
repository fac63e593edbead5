//! Field readers for documents that come from the cluster, used with
//! `#[serde(deserialize_with = "...")]`.
//!
//! Upstream's workers are Go: a JSON `null` or an absent key leaves a field at
//! its zero value, and the real cluster relies on that (it lists instances
//! that are not running yet with `null` addresses, and sends numbers as
//! strings in places). These readers give the same results, and a list reads
//! its entries one by one so that an entry that cannot be read costs only
//! that entry, never the whole document.

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer};
use serde_json::Value;

/// A string; `null` is empty and a number or boolean is taken as its text.
pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => {
            return Err(de::Error::custom(format!(
                "expected a string, found {other}"
            )));
        }
    })
}

/// A list whose entries are read one by one: `null` or a non-list is empty,
/// and an entry that does not parse is logged and left out.
pub fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let entries = match Value::deserialize(d)? {
        Value::Array(entries) => entries,
        Value::Null => return Ok(Vec::new()),
        other => {
            tracing::warn!(found = %other, "expected a list; treated as empty");
            return Ok(Vec::new());
        }
    };
    Ok(entries
        .into_iter()
        .filter_map(|entry| match T::deserialize(&entry) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(%entry, "skipping a list entry that cannot be read: {e}");
                None
            }
        })
        .collect())
}

/// A non-negative integer, as a number or a numeric string; `null` is 0.
pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| de::Error::custom(format!("{n} is not a non-negative integer"))),
        Value::String(s) if s.trim().is_empty() => Ok(0),
        Value::String(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| de::Error::custom(format!("{s:?} is not a number"))),
        Value::Null => Ok(0),
        other => Err(de::Error::custom(format!(
            "expected a number, found {other}"
        ))),
    }
}

/// A port (see [`u64`]); 0 means "none".
pub fn u16<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let v = u64(d)?;
    u16::try_from(v).map_err(|_| de::Error::custom(format!("{v} is not a port")))
}

/// See [`u64`].
pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u64(d)?;
    u32::try_from(v).map_err(|_| de::Error::custom(format!("{v} is out of range")))
}

/// A boolean; `null`, `""` and absent are false, and `"true"`/`"false"` in
/// any case are accepted.
pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::Null => Ok(false),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.is_empty() || s.eq_ignore_ascii_case("false") => Ok(false),
        other => Err(de::Error::custom(format!(
            "expected a boolean, found {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    struct Entry {
        #[serde(default, deserialize_with = "u32")]
        n: u32,
        #[serde(default, deserialize_with = "string")]
        s: String,
    }

    #[derive(Debug, Deserialize)]
    struct Doc {
        #[serde(default, deserialize_with = "list")]
        entries: Vec<Entry>,
        #[serde(default, deserialize_with = "u16")]
        port: u16,
        #[serde(default, deserialize_with = "bool")]
        flag: bool,
    }

    #[test]
    fn nulls_strings_and_bad_entries() {
        let d: Doc = serde_json::from_str(
            r#"{"entries":[{"n":"1","s":null},{"n":"x"},7,{"n":2,"s":5}],"port":"50103","flag":"TRUE"}"#,
        )
        .unwrap();
        assert_eq!(
            d.entries,
            vec![
                Entry {
                    n: 1,
                    s: String::new()
                },
                Entry {
                    n: 2,
                    s: "5".into()
                }
            ]
        );
        assert_eq!(d.port, 50103);
        assert!(d.flag);
        let d: Doc = serde_json::from_str(r#"{"entries":null,"port":null,"flag":null}"#).unwrap();
        assert!(d.entries.is_empty() && d.port == 0 && !d.flag);
        assert!(serde_json::from_str::<Doc>(r#"{"port":70000}"#).is_err());
        let d: Doc = serde_json::from_str(r#"{"entries":"no"}"#).unwrap();
        assert!(d.entries.is_empty());
    }
}
