"""Optimizers and learning-rate schedules built from `config.optim` and `config.schedule`."""

import ml_collections
import optax


def create_learning_rate_schedule(
    optim_config: ml_collections.ConfigDict,
    schedule_config: ml_collections.ConfigDict,
    num_steps: int,
) -> optax.Schedule:
    """Linear warmup, then constant, cosine or polynomial ("poly") decay."""
    base = optim_config.learning_rate
    warmup = min(schedule_config.warmup_steps, num_steps)
    decay_steps = max(num_steps - warmup, 1)
    end_value = base * schedule_config.end_factor
    if schedule_config.name == "constant":
        decay = optax.constant_schedule(base)
    elif schedule_config.name == "cosine":
        decay = optax.cosine_decay_schedule(
            base, decay_steps, alpha=schedule_config.end_factor
        )
    elif schedule_config.name == "poly":
        decay = optax.polynomial_schedule(
            base, end_value, schedule_config.power, decay_steps
        )
    else:
        raise ValueError(f"Unknown config.schedule.name={schedule_config.name!r}.")
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(0.0, base, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> optax.GradientTransformation:
    """The optimizer of `config.optim`, with optional global-norm clipping."""
    optim = config.optim
    schedule = create_learning_rate_schedule(
        optim, config.schedule, config.train.num_steps
    )
    if optim.name == "adam":
        optimizer = optax.adam(schedule)
    elif optim.name == "adamw":
        optimizer = optax.adamw(schedule, weight_decay=optim.weight_decay)
    elif optim.name == "sgd":
        optimizer = optax.sgd(schedule, momentum=optim.momentum)
    else:
        raise ValueError(f"Unknown config.optim.name={optim.name!r}.")
    if optim.name != "adamw" and optim.weight_decay:
        optimizer = optax.chain(
            optax.add_decayed_weights(optim.weight_decay), optimizer
        )
    if optim.grad_clip_norm:
        optimizer = optax.chain(
            optax.clip_by_global_norm(optim.grad_clip_norm), optimizer
        )
    return optimizer
