//! Binary cross-entropy on logits, in a form that never overflows.

use candle_core::{D, Tensor};

use crate::error::{CandleContext, Result};

/// Mean binary cross-entropy with logits over all elements, like fastai's
/// `BCEWithLogitsLossFlat` (PyTorch's `BCEWithLogitsLoss` with mean reduction).
///
/// `logits` and `targets` have the same shape `[N, C]`; `pos_weight`, when
/// given, has `C` elements and multiplies the positive term of each class.
/// Each element is `(1 − y)·x + w·softplus(−x)` with `w = 1 + (pos_weight − 1)·y`,
/// which equals `max(x, 0) − x·y + log1p(exp(−|x|))` when `w = 1`.
///
/// The softplus is computed as `m + log(exp(−m) + exp(−x − m))` with
/// `m = max(−x, 0)`: no `exp` ever sees a positive argument, so logits of
/// ±100 give finite values (candle's naive `log(sigmoid)` gives NaN there),
/// and the gradient through `m` cancels exactly, so the gradient is
/// `((1 − y) − w·sigmoid(−x)) / numel` everywhere, `x = 0` included.
pub fn bce_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    pos_weight: Option<&Tensor>,
) -> Result<Tensor> {
    let ctx = || "bce_with_logits".to_string();
    if logits.dims() != targets.dims() {
        return Err(crate::Error::Invalid(format!(
            "logits have shape {:?} but targets have shape {:?}",
            logits.dims(),
            targets.dims()
        )));
    }
    let targets = targets.to_dtype(logits.dtype()).ctx(ctx)?;
    let neg = logits.neg().ctx(ctx)?;
    let m = neg.relu().ctx(ctx)?;
    let softplus_neg = (&m
        + (m.neg().ctx(ctx)?.exp().ctx(ctx)? + (&neg - &m).ctx(ctx)?.exp().ctx(ctx)?)
            .ctx(ctx)?
            .log()
            .ctx(ctx)?)
    .ctx(ctx)?;
    let one_minus_y = targets.affine(-1.0, 1.0).ctx(ctx)?;
    let negative_term = (one_minus_y * logits).ctx(ctx)?;
    let positive_term = match pos_weight {
        None => softplus_neg,
        Some(pw) => {
            let n_classes = logits.dim(D::Minus1).ctx(ctx)?;
            if pw.elem_count() != n_classes {
                return Err(crate::Error::Invalid(format!(
                    "pos_weight has {} elements but there are {n_classes} classes",
                    pw.elem_count()
                )));
            }
            let pw = pw
                .to_dtype(logits.dtype())
                .ctx(ctx)?
                .reshape(n_classes)
                .ctx(ctx)?;
            // w = 1 + (pos_weight - 1) * y
            let weight = targets
                .broadcast_mul(&pw.affine(1.0, -1.0).ctx(ctx)?)
                .ctx(ctx)?
                .affine(1.0, 1.0)
                .ctx(ctx)?;
            (weight * softplus_neg).ctx(ctx)?
        }
    };
    (negative_term + positive_term)
        .ctx(ctx)?
        .mean_all()
        .ctx(ctx)
}
