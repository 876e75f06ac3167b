//! Raw SQL that Postgres plans once per connection.
//!
//! `diesel::sql_query` is never kept as a prepared statement: every call is
//! parsed and planned again. For the relay's claim that is 1 to 4 ms of
//! planning for a query that runs in under 1 ms on a small backlog, paid on
//! every poll. A [`Prepared`] statement is cached by diesel under its marker
//! type `M` (one marker per SQL text), so Postgres parses it once per
//! connection and, after a few runs, may switch to a generic plan when that
//! is as cheap (`plan_cache_mode = auto`).

use std::marker::PhantomData;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{
    Array, BigInt, Double, Integer, Jsonb, Nullable, Text, Timestamptz, Untyped, Uuid as SqlUuid,
};
use diesel::{PgConnection, QueryResult, RunQueryDsl};

/// A bind value of a [`Prepared`] statement, for placeholder `$n` at
/// position `n - 1`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bind<'a> {
    Text(&'a str),
    NullableText(Option<&'a str>),
    Timestamptz(&'a chrono::DateTime<chrono::Utc>),
    Jsonb(&'a crate::envelope::JsonPayload),
    BigInt(i64),
    NullableBigInt(Option<i64>),
    Integer(i32),
    Double(f64),
    Uuid(uuid::Uuid),
    BigIntArray(&'a [i64]),
    NullableBigIntArray(Option<&'a [i64]>),
    TextArray(&'a [String]),
    UuidArray(&'a [uuid::Uuid]),
    DoubleArray(&'a [f64]),
}

/// `sql` with placeholders `$1`, `$2`, ... (each may appear more than once;
/// the SQL must not otherwise contain `$`) and their values. `M` must be a
/// type used for this SQL text only: it is the statement's cache key.
pub(crate) struct Prepared<'a, M> {
    sql: &'static str,
    binds: Vec<Bind<'a>>,
    marker: PhantomData<M>,
}

impl<'a, M: 'static> Prepared<'a, M> {
    pub(crate) fn new(sql: &'static str, binds: Vec<Bind<'a>>) -> Self {
        Self {
            sql,
            binds,
            marker: PhantomData,
        }
    }
}

impl<M: 'static> QueryId for Prepared<'_, M> {
    type QueryId = M;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<M> Query for Prepared<'_, M> {
    type SqlType = Untyped;
}

impl<M> RunQueryDsl<PgConnection> for Prepared<'_, M> {}

fn builder_error(message: String) -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError(message.into())
}

impl<M> QueryFragment<Pg> for Prepared<'_, M> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let mut rest = self.sql;
        while let Some(at) = rest.find('$') {
            out.push_sql(&rest[..at]);
            let after = &rest[at + 1..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            let bind = after[..digits]
                .parse::<usize>()
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|index| self.binds.get(index))
                .ok_or_else(|| {
                    builder_error(format!("bad placeholder at byte {at} of a prepared statement"))
                })?;
            match bind {
                Bind::Text(value) => out.push_bind_param::<Text, str>(value)?,
                Bind::NullableText(value) => out.push_bind_param::<Nullable<Text>, Option<&str>>(value)?,
                Bind::Timestamptz(value) => {
                    out.push_bind_param::<Timestamptz, chrono::DateTime<chrono::Utc>>(value)?;
                }
                Bind::Jsonb(value) => out.push_bind_param::<Jsonb, crate::envelope::JsonPayload>(value)?,
                Bind::BigInt(value) => out.push_bind_param::<BigInt, i64>(value)?,
                Bind::NullableBigInt(value) => out.push_bind_param::<Nullable<BigInt>, Option<i64>>(value)?,
                Bind::Integer(value) => out.push_bind_param::<Integer, i32>(value)?,
                Bind::Double(value) => out.push_bind_param::<Double, f64>(value)?,
                Bind::Uuid(value) => out.push_bind_param::<SqlUuid, uuid::Uuid>(value)?,
                Bind::BigIntArray(values) => out.push_bind_param::<Array<BigInt>, [i64]>(values)?,
                Bind::NullableBigIntArray(values) => {
                    out.push_bind_param::<Nullable<Array<BigInt>>, Option<&[i64]>>(values)?;
                }
                Bind::TextArray(values) => out.push_bind_param::<Array<Text>, [String]>(values)?,
                Bind::UuidArray(values) => out.push_bind_param::<Array<SqlUuid>, [uuid::Uuid]>(values)?,
                Bind::DoubleArray(values) => out.push_bind_param::<Array<Double>, [f64]>(values)?,
            }
            rest = &after[digits..];
        }
        out.push_sql(rest);
        Ok(())
    }
}
