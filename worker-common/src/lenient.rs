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
    Ok(opt_string(d)?.unwrap_or_default())
}

/// [`string`], with `null` (or an absent key, given `#[serde(default)]`) as
/// `None`, for fields whose absence means something.
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        Value::Null => None,
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
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

/// A list of strings where every entry matters (a command line, an
/// environment): `null` and `""` are empty, a single string is a one-entry
/// list, and anything but strings is an error.
pub fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                other => Err(de::Error::custom(format!(
                    "expected strings, found {other}"
                ))),
            })
            .collect(),
        other => Err(de::Error::custom(format!(
            "expected a list of strings, found {other}"
        ))),
    }
}

/// `null` as the type's default; anything else as the type reads it.
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A non-negative integer, as a number (also `64.0`, as Python writes
/// floats) or a numeric string; `null` and `""` are 0.
pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(opt_u64(d)?.unwrap_or(0))
}

/// [`u64`], with `null` and `""` as `None`.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => Ok(Some(u)),
            // Below 2^53 every integral float is exact.
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < 9_007_199_254_740_992.0 => {
                Ok(Some(f as u64))
            }
            _ => Err(de::Error::custom(format!(
                "{n} is not a non-negative integer"
            ))),
        },
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| de::Error::custom(format!("{s:?} is not a non-negative integer"))),
        Value::Null => Ok(None),
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
    Ok(opt_u32(d)?.unwrap_or(0))
}

/// See [`opt_u64`].
pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_u64(d)?
        .map(|v| u32::try_from(v).map_err(|_| de::Error::custom(format!("{v} is out of range"))))
        .transpose()
}

/// A finite non-negative number, as a number or a numeric string; `null`
/// and `""` are `None`.
pub fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let f = match Value::deserialize(d)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if s.trim().is_empty() => return Ok(None),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        Value::Null => return Ok(None),
        other => {
            return Err(de::Error::custom(format!(
                "expected a number, found {other}"
            )));
        }
    };
    match f {
        Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f)),
        _ => Err(de::Error::custom("expected a finite non-negative number")),
    }
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

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Job {
        #[serde(deserialize_with = "opt_string")]
        name: Option<String>,
        #[serde(deserialize_with = "opt_u32")]
        instance: Option<u32>,
        #[serde(deserialize_with = "u64")]
        memory: u64,
        #[serde(deserialize_with = "opt_f64")]
        vcpus: Option<f64>,
        #[serde(deserialize_with = "string_list")]
        cmd: Vec<String>,
        #[serde(deserialize_with = "null_as_default")]
        tags: Vec<u8>,
    }

    fn job(text: &str) -> Result<Job, serde_json::Error> {
        serde_json::from_str(text)
    }

    #[test]
    fn optional_fields_and_python_numbers() {
        let j = job(
            r#"{"name":null,"instance":"3","memory":64.0,"vcpus":"0.5","cmd":"sh","tags":null}"#,
        )
        .unwrap();
        assert_eq!(j.name, None);
        assert_eq!(j.instance, Some(3));
        assert_eq!(j.memory, 64);
        assert_eq!(j.vcpus, Some(0.5));
        assert_eq!(j.cmd, ["sh"]);
        assert!(j.tags.is_empty());
        let j = job(r#"{"name":7,"instance":"","cmd":["a","b"],"vcpus":null}"#).unwrap();
        assert_eq!(j.name.as_deref(), Some("7"));
        assert_eq!((j.instance, j.vcpus), (None, None));
        assert_eq!(j.cmd, ["a", "b"]);
        assert!(job(r#"{"cmd":""}"#).unwrap().cmd.is_empty());
        for bad in [
            r#"{"name":{}}"#,
            r#"{"instance":-1}"#,
            r#"{"instance":5000000000}"#,
            r#"{"memory":1.5}"#,
            r#"{"memory":"x"}"#,
            r#"{"vcpus":-1}"#,
            r#"{"vcpus":"inf"}"#,
            r#"{"cmd":[1]}"#,
            r#"{"cmd":{"x":1}}"#,
            r#"{"tags":"x"}"#,
        ] {
            assert!(job(bad).is_err(), "{bad} accepted");
        }
    }
}
