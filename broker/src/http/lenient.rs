//! Integers as JSON Schema (and so OpenAPI) defines them: any number with no fractional part,
//! so `3.0` is the integer 3, as a client generating requests from `/openapi.json` may send.
//! serde's integer types refuse `3.0`; fields and query parameters declared `integer` use these
//! instead. Query strings carry text, which is parsed the same way.

use serde::de::{Deserializer, Error, Visitor};

struct Integer;

impl Visitor<'_> for Integer {
    type Value = i128;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an integer")
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<i128, E> {
        Ok(i128::from(v))
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<i128, E> {
        Ok(i128::from(v))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<i128, E> {
        // Within ±2^63 every f64 with no fraction is exactly an integer.
        if v.fract() == 0.0 && v.abs() < 9.2e18 {
            Ok(v as i128)
        } else {
            Err(E::custom(format!("{v} is not an integer")))
        }
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<i128, E> {
        match v.parse::<i128>() {
            Ok(n) => Ok(n),
            Err(_) => v
                .parse::<f64>()
                .map_err(|_| E::custom(format!("'{v}' is not an integer")))
                .and_then(|f| self.visit_f64(f)),
        }
    }
}

fn integer<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<T, D::Error> {
    let n = d.deserialize_any(Integer)?;
    T::try_from(n).map_err(|_| D::Error::custom(format!("{n} is out of range")))
}

pub fn u16<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    integer(d)
}

pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    integer(d)
}

pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    integer(d)
}

/// An optional integer: absent or null is None.
pub mod opt {
    use serde::de::{Deserialize, Deserializer};

    fn optional<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Option<T>, D::Error> {
        #[derive(serde::Deserialize)]
        struct Wrap(#[serde(deserialize_with = "super::i128")] i128);
        match Option::<Wrap>::deserialize(d)? {
            None => Ok(None),
            Some(Wrap(n)) => T::try_from(n)
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("{n} is out of range"))),
        }
    }

    pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        optional(d)
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        optional(d)
    }

    pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        optional(d)
    }
}

fn i128<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
    d.deserialize_any(Integer)
}

#[cfg(test)]
mod tests {
    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[serde(deserialize_with = "super::u32")]
        partition: u32,
        #[serde(default, deserialize_with = "super::opt::u64")]
        timeout: Option<u64>,
    }

    #[test]
    fn integral_numbers_in_any_spelling_are_integers() {
        let parse = |text: &str| serde_json::from_str::<Body>(text).map(|b| (b.partition, b.timeout));
        assert_eq!(parse(r#"{"partition": 3}"#).ok(), Some((3, None)));
        assert_eq!(parse(r#"{"partition": 3.0, "timeout": 1e3}"#).ok(), Some((3, Some(1000))));
        assert_eq!(parse(r#"{"partition": 3, "timeout": null}"#).ok(), Some((3, None)));
        assert!(parse(r#"{"partition": 3.5}"#).is_err());
        assert!(parse(r#"{"partition": -1}"#).is_err());
        assert!(parse(r#"{"partition": 4294967296}"#).is_err());
        assert!(parse(r#"{"partition": "3"}"#).is_ok(), "query strings are text");
        let query: Result<Body, _> = serde_urlencoded_like("partition=2.0&timeout=5");
        assert_eq!(query.map(|b| (b.partition, b.timeout)).ok(), Some((2, Some(5))));
    }

    fn serde_urlencoded_like(query: &str) -> Result<Body, actix_web::error::QueryPayloadError> {
        actix_web::web::Query::<Body>::from_query(query).map(|q| q.into_inner())
    }
}
