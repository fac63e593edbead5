//! Command-line pieces both daemons use. Every setting a daemon takes from
//! its environment is a clap argument with `env = "..."`, so `--help` lists
//! it and nothing deep inside reads the environment.

use std::convert::Infallible;

/// A value parser for an argument with a default: an empty value (e.g.
/// `CONTAINERD_ADDRESS=` left in a unit file) means the default, as an
/// absent one does. clap would otherwise take the empty string as given.
///
/// `#[arg(long, env = "X", default_value = D, value_parser = empty_is_default::<PathBuf>(D))]`
pub fn empty_is_default<T>(
    default: &'static str,
) -> impl Fn(&str) -> Result<T, Infallible> + Clone + Send + Sync + 'static
where
    T: for<'a> From<&'a str>,
{
    move |value: &str| {
        Ok(T::from(if value.trim().is_empty() {
            default
        } else {
            value
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn empty_values_fall_back() {
        let path = empty_is_default::<PathBuf>("/etc/x.json");
        assert_eq!(path(""), Ok(PathBuf::from("/etc/x.json")));
        assert_eq!(path("/tmp/y.json"), Ok(PathBuf::from("/tmp/y.json")));
        let name = empty_is_default::<String>("oakestra");
        assert_eq!(name("  ").as_deref(), Ok("oakestra"));
        assert_eq!(name("ns1").as_deref(), Ok("ns1"));
    }
}
