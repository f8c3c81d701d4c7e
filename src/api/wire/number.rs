//! Integer fields as JSON Schema and pydantic read them: `2` and `2.0` are the same integer, `2.5`
//! is not one. serde alone refuses `2.0` for an integer field, which a schema-driven client (or a
//! JavaScript one, where every number is a float) may well send.

use serde::{Deserialize, Deserializer};

/// An optional integer field that also accepts integral floats; out of range for `T` is an error.
pub fn integer<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let whole: i128 = if let Some(u) = number.as_u64() {
        u.into()
    } else if let Some(i) = number.as_i64() {
        i.into()
    } else {
        // A float here is a literal with a fraction or an exponent, or an integer past 64 bits
        // (serde_json keeps those as f64). Past 2^53 a float no longer says which integer was
        // sent (-9223372036854775809 reads as -2^63, a valid i64), so such a value is out of
        // range for every field here rather than rounded into it.
        let f = number.as_f64().unwrap_or(f64::NAN);
        if f.fract() != 0.0 || !f.is_finite() {
            return Err(D::Error::custom(format!(
                "expected an integer, got {number}"
            )));
        }
        if f.abs() >= 2f64.powi(53) {
            return Err(D::Error::custom(format!("{number} is out of range")));
        }
        f as i128
    };
    T::try_from(whole)
        .map(Some)
        .map_err(|_| D::Error::custom(format!("{number} is out of range")))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct N {
        #[serde(default, deserialize_with = "super::integer")]
        n: Option<u32>,
    }

    fn n(json: &str) -> Result<Option<u32>, String> {
        serde_json::from_str::<N>(json)
            .map(|v| v.n)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn integral_floats_are_integers_and_nothing_else_is() {
        assert_eq!(n(r#"{"n": 2}"#), Ok(Some(2)));
        assert_eq!(n(r#"{"n": 2.0}"#), Ok(Some(2)));
        assert_eq!(n(r#"{"n": 4294967295}"#), Ok(Some(u32::MAX)));
        assert_eq!(n(r#"{"n": null}"#), Ok(None));
        assert_eq!(n(r#"{}"#), Ok(None));
        assert!(n(r#"{"n": 2.5}"#)
            .unwrap_err()
            .contains("expected an integer"));
        assert!(n(r#"{"n": -1}"#).unwrap_err().contains("out of range"));
        assert!(n(r#"{"n": 4294967296}"#)
            .unwrap_err()
            .contains("out of range"));
        assert!(n(r#"{"n": 1e300}"#).is_err());
        assert!(n(r#"{"n": 3e0}"#) == Ok(Some(3)));
        assert!(n(r#"{"n": "2"}"#).is_err());
    }
}

#[cfg(test)]
mod seed_tests {
    #[derive(serde::Deserialize)]
    struct Seed {
        #[serde(default, deserialize_with = "super::integer")]
        seed: Option<i64>,
    }

    #[test]
    fn integers_past_64_bits_are_out_of_range_not_rounded_into_it() {
        let seed = |json: &str| serde_json::from_str::<Seed>(json).map(|s| s.seed);
        assert_eq!(
            seed(r#"{"seed": -9223372036854775808}"#).unwrap(),
            Some(i64::MIN)
        );
        assert!(seed(r#"{"seed": -9223372036854775809}"#).is_err());
        assert!(seed(r#"{"seed": 9223372036854775808}"#).is_err());
        assert_eq!(
            seed(r#"{"seed": 9223372036854775807}"#).unwrap(),
            Some(i64::MAX)
        );
    }
}
