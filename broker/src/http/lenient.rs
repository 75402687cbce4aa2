//! Integers as JSON Schema (and so OpenAPI) defines them: any number with no fractional part,
//! so `3.0` is the integer 3, as a client generating requests from `/openapi.json` may send.
//! serde's integer types refuse `3.0`; fields declared `integer` use these instead. A JSON
//! string is not an integer; query parameters, which are all text, use [`query`].

use serde::de::{Deserializer, Error, Visitor};

/// Visits an integer; `text` also takes one written as a string (query strings).
struct Integer {
    text: bool,
}

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
        if !self.text {
            return Err(E::invalid_type(serde::de::Unexpected::Str(v), &self));
        }
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
    let n = d.deserialize_any(Integer { text: false })?;
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

pub fn i16<'de, D: Deserializer<'de>>(d: D) -> Result<i16, D::Error> {
    integer(d)
}

/// An optional integer: absent or null is None.
pub mod opt {
    use serde::de::{Deserialize, Deserializer};

    fn optional<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Option<T>, D::Error> {
        #[derive(serde::Deserialize)]
        struct Wrap(#[serde(deserialize_with = "super::number")] i128);
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

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        optional(d)
    }

    pub fn i32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
        optional(d)
    }

    pub fn i16<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i16>, D::Error> {
        optional(d)
    }
}

/// Optional integer query parameters (text).
pub mod query {
    use serde::de::{Deserializer, Error};

    fn optional<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Option<T>, D::Error> {
        let n = d.deserialize_any(super::Integer { text: true })?;
        T::try_from(n)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{n} is out of range")))
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        optional(d)
    }

    pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        optional(d)
    }

    /// A log offset: Kafka's offsets are int64, so at most `i64::MAX` (as documented).
    pub fn offset<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let offset: Option<i64> = optional(d)?;
        offset
            .map(|o| u64::try_from(o).map_err(|_| D::Error::custom(format!("{o} is out of range"))))
            .transpose()
    }
}

fn number<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
    d.deserialize_any(Integer { text: false })
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

    #[derive(Debug, serde::Deserialize)]
    struct Query {
        #[serde(default, deserialize_with = "super::query::u64")]
        timeout: Option<u64>,
    }

    #[test]
    fn integral_numbers_in_any_spelling_are_integers() {
        let parse =
            |text: &str| serde_json::from_str::<Body>(text).map(|b| (b.partition, b.timeout));
        assert_eq!(parse(r#"{"partition": 3}"#).ok(), Some((3, None)));
        assert_eq!(
            parse(r#"{"partition": 3.0, "timeout": 1e3}"#).ok(),
            Some((3, Some(1000)))
        );
        assert_eq!(
            parse(r#"{"partition": 3, "timeout": null}"#).ok(),
            Some((3, None))
        );
        assert!(parse(r#"{"partition": 3.5}"#).is_err());
        assert!(parse(r#"{"partition": -1}"#).is_err());
        assert!(parse(r#"{"partition": 4294967296}"#).is_err());
        assert!(
            parse(r#"{"partition": "3"}"#).is_err(),
            "a JSON string is not an integer"
        );
        let query = |text: &str| {
            actix_web::web::Query::<Query>::from_query(text).map(|q| q.into_inner().timeout)
        };
        assert_eq!(query("timeout=5").ok(), Some(Some(5)));
        assert_eq!(query("timeout=2.0").ok(), Some(Some(2)));
        assert_eq!(query("").ok(), Some(None));
        assert!(query("timeout=-1").is_err());
        assert!(query("timeout=x").is_err());
        #[derive(Debug, serde::Deserialize)]
        struct Offset {
            #[serde(default, deserialize_with = "super::query::offset")]
            offset: Option<u64>,
        }
        let offset = |text: &str| {
            actix_web::web::Query::<Offset>::from_query(text).map(|q| q.into_inner().offset)
        };
        assert_eq!(
            offset("offset=9223372036854775807").ok(),
            Some(Some(i64::MAX as u64))
        );
        assert!(offset("offset=9223372036854775808").is_err(), "past int64");
        assert!(offset("offset=-1").is_err());
    }
}

/// A JSON object decoded as `T`, and only an object: serde's derived structs also accept an
/// array of their fields in order (`[null, null]` for a record), which the OpenAPI document
/// does not allow. Decoding goes through `deserialize_map`, so there is no second parse.
#[derive(Debug)]
pub struct Object<T>(pub T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Map<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for Map<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Map(std::marker::PhantomData)).map(Object)
    }
}

/// A list of objects (see [`Object`]).
pub fn objects<'de, D: Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    let list: Vec<Object<T>> = serde::Deserialize::deserialize(d)?;
    Ok(list.into_iter().map(|o| o.0).collect())
}

/// An optional value that, when present, is not null (the document types it without null).
pub fn present<'de, D: Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[cfg(test)]
mod object_tests {
    use super::Object;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Record {
        key: Option<u32>,
        value: Option<u32>,
    }

    #[test]
    fn only_objects_decode_as_structs() {
        assert!(serde_json::from_str::<Object<Record>>(r#"{"key": 1}"#).is_ok());
        assert!(
            serde_json::from_str::<Record>("[null, null]").is_ok(),
            "serde's own"
        );
        assert!(serde_json::from_str::<Object<Record>>("[null, null]").is_err());
    }
}
