//! Language models on top of the contract: model names, the tokenizer, and
//! `lockstep generate` / `replay-layer` / `tokenize`.

pub mod distribute;
pub mod generate;
pub mod models;
pub mod tokenize;
pub mod tokenizer;
