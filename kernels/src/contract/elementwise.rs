//! Elementwise ops (CONTRACT.md §9.7): the residual add and the product.

use super::canonicalize;
use super::prim::{add, mul};

/// `x_i = add(x_i, y_i)`, canonicalised (the residual connection).
#[inline(always)]
pub fn add_spec(x: &mut [f32], y: &[f32]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x = canonicalize(add(*x, y));
    }
}

/// `x_i = mul(x_i, y_i)`, canonicalised.
#[inline(always)]
pub fn mul_spec(x: &mut [f32], y: &[f32]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x = canonicalize(mul(*x, y));
    }
}
