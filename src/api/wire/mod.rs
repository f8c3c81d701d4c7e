//! OpenAI's JSON shapes (requests, responses, chunks, errors), with utoipa schemas. Only `api` sees them.

pub mod number;
pub mod request;
pub mod response;
pub mod responses;
pub mod tokenize;

pub use request::*;
pub use response::*;
pub use responses::*;
pub use tokenize::*;
