"""What the GPT-NeoX reader does with every key of a GPT-NeoX training yml.

GPT-NeoX's ``NeoXArgs`` (``megatron/neox_arguments/neox_args.py``, v1.0 and later, plus
``deepspeed_args.py``) has about 320 settings. The ones that shape the model are listed in
``NEOX_MODEL_KEYS`` with what the reader does with each: ``read`` into ``ModelConfig``,
``checked`` (accepted for the values in the note, otherwise a ``ConfigError`` naming the key and
its value) or ``ignored`` with the reason. ``NEOX_OTHER_KEYS`` are the settings of training,
data, logging, DeepSpeed and the launcher, which do not change the weights' meaning. Keys in
neither set are logged. ``check_neox_yml`` runs when the yml is read, before any tensor.

Defaults are GPT-NeoX's, so an absent key means what it meant to GPT-NeoX (``pos-emb`` absent
is ``learned``; ``no-weight-tying`` absent is ``false``, tied embeddings).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from pythia_jax.errors import ConfigError

logger = logging.getLogger(__name__)

# attention types of ``attention-config`` that compute dense causal softmax attention
DENSE_ATTENTION_TYPES = ("global", "flash")

NEOX_MODEL_KEYS: dict[str, tuple[str, str]] = {
    # shapes and rotary
    "num_layers": ("read", "num_layers"),
    "hidden_size": ("read", "hidden_size"),
    "num_attention_heads": ("read", "num_heads"),
    "seq_length": ("read", "max_position_embeddings when max-position-embeddings is absent"),
    "max_position_embeddings": ("read", "max_position_embeddings"),
    "rotary_pct": ("read", "rotary_pct (GPT-NeoX default 1.0)"),
    "rotary_emb_base": ("read", "rotary_emb_base (default 10000)"),
    "layernorm_epsilon": ("read", "layer_norm_eps (default 1e-5)"),
    "gpt_j_residual": ("read", "use_parallel_residual (default false)"),
    "bias_gelu_fusion": ("read", "true: tanh GELU (the fused kernel is the tanh approximation)"),
    "openai_gelu": ("read", "true: tanh GELU"),
    "init_method": ("read", "init_method when one of pythia-jax's"),
    "output_layer_init_method": ("read", "output_init_method when one of pythia-jax's"),
    "model_parallel_size": ("read", "tensor-parallel size; must match the checkpoint files"),
    "pipe_parallel_size": ("read", "file layout (pipeline or sequential), found from the files"),
    # architecture switches: one value is this model
    "pos_emb": ("checked", "must be 'rotary' (absent: GPT-NeoX's default 'learned')"),
    "no_weight_tying": ("checked", "must be true (absent or false: input and output embeddings tied)"),
    "norm": ("checked", "must be 'layernorm' (the default)"),
    "activation": ("checked", "must be 'gelu' (the default)"),
    "gpt_j_tied": ("checked", "must be false: one shared LayerNorm per block has no GPT-NeoX/HF equivalent"),
    "attention_config": ("checked", f"every layer one of {DENSE_ATTENTION_TYPES} (dense causal attention)"),
    "num_unique_layers": ("checked", "null or num-layers (shared layers are not supported)"),
    "num_kv_heads": ("checked", "null or num-attention-heads (no grouped-query attention)"),
    "sliding_window_width": ("checked", "null (no sliding-window attention)"),
    "use_qk_layernorm": ("checked", "false (no query/key LayerNorm)"),
    "use_bias_in_norms": ("checked", "true (the default)"),
    "use_bias_in_attn_linear": ("checked", "true (the default)"),
    "use_bias_in_mlp": ("checked", "true (the default)"),
    "soft_prompt_tuning": ("checked", "null or not enabled (no soft-prompt embedding)"),
    "output_layer_parallelism": ("checked", "'column' (the head is split by rows of its weight)"),
    "use_mup": ("checked", "false (muP rescales attention and logits)"),
    "moe_num_experts": ("checked", "null or 1 (no mixture-of-experts layers)"),
    "sparse_attention": ("checked", "null (DeepSpeed sparse attention)"),
    # no effect on what the weights compute
    "precision": ("ignored", "each tensor's own dtype is read"),
    "intermediate_size": ("ignored", "the MLP width is read from the tensors"),
    "expansion_factor": ("ignored", "the MLP width is read from the tensors"),
    "mlp_multiple_of": ("ignored", "the MLP width is read from the tensors"),
    "make_vocab_size_divisible_by": ("ignored", "the vocabulary size is read from the tensors"),
    "padded_vocab_size": ("ignored", "the vocabulary size is read from the tensors"),
    "rms_norm_epsilon": ("ignored", "used only with norm 'rmsnorm', which is refused"),
    "scalenorm_epsilon": ("ignored", "used only with norm 'scalenorm', which is refused"),
    "rpe_num_buckets": ("ignored", "used only with pos-emb 'rpe', which is refused"),
    "rpe_max_distance": ("ignored", "used only with pos-emb 'rpe', which is refused"),
    "opt_pos_emb_offset": ("ignored", "used only with learned position embeddings, which are refused"),
    "sparsity_config": ("ignored", "used only by sparse attention types, which are refused"),
    "param_sharing_style": ("ignored", "used only with num-unique-layers, which is refused"),
    "gmlp_attn_dim": ("ignored", "used only by gMLP layers, which are refused"),
    "use_flashattn_swiglu": ("ignored", "used only with the swiglu activation, which is refused"),
    "dim_att": ("ignored", "used only by RWKV layers, which are refused"),
    "head_size": ("ignored", "used only by RWKV layers, which are refused"),
    "ffn_dim": ("ignored", "used only by RWKV layers, which are refused"),
    "mamba_selective_scan_fusion": ("ignored", "used only by Mamba layers, which are refused"),
    "mamba_causal_conv_fusion": ("ignored", "used only by Mamba layers, which are refused"),
    "mamba_inner_func_fusion": ("ignored", "used only by Mamba layers, which are refused"),
    "mamba_selective_fp32_params": ("ignored", "used only by Mamba layers, which are refused"),
    "mamba_use_bias_in_conv": ("ignored", "used only by Mamba layers, which are refused"),
    "mamba_use_bias_in_linears": ("ignored", "used only by Mamba layers, which are refused"),
    "scaled_upper_triang_masked_softmax_fusion": ("ignored", "a fused kernel for the same softmax"),
    "scaled_masked_softmax_fusion": ("ignored", "a fused kernel for the same softmax"),
    "bias_dropout_fusion": ("ignored", "a fused kernel for the same bias-add and dropout"),
    "rope_fusion": ("ignored", "a fused kernel for the same rotary embedding"),
    "layernorm_fusion": ("ignored", "a fused kernel for the same LayerNorm"),
    "rmsnorm_fusion": ("ignored", "used only with norm 'rmsnorm', which is refused"),
    "fused_kernels_build_path": ("ignored", "where fused kernels are built"),
    "apply_query_key_layer_scaling": ("ignored", "divides the scores by the layer number and multiplies "
                                                 "the softmax input back: the same attention"),
    "attention_softmax_in_fp32": ("ignored", "numerics of the softmax, not the model"),
    "fp16_lm_cross_entropy": ("ignored", "numerics of the loss, not the model"),
    "init_method_std": ("ignored", "random initialisation only"),
    "use_cpu_initialization": ("ignored", "where the random initialisation runs"),
    "rotary_save_freqs_buffer": ("ignored", "whether inv_freq is saved; the reader skips it"),
    "attention_dropout": ("ignored", "off at inference; pythia-jax trains without dropout (non-zero is logged)"),
    "hidden_dropout": ("ignored", "off at inference; pythia-jax trains without dropout (non-zero is logged)"),
    "serve_model_weights": ("ignored", "weight serving during training"),
    "weight_server_port": ("ignored", "weight serving during training"),
    "online_dataserver_ips": ("ignored", "online data serving during training"),
    "online_dataserver_ports": ("ignored", "online data serving during training"),
    **{f"te_{k}": ("ignored", "Transformer Engine kernels for the same layers; weights are saved unscaled")
       for k in ("columnparallel", "rowparallel", "layernorm_mlp", "mha", "fp8_format", "fp8_wgrad",
                 "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin", "fp8_mha")},
}

# Every other NeoXArgs / DeepSpeed setting of GPT-NeoX v1.0 and later (training, data, logging,
# checkpointing, launcher, text generation): no effect on what the saved weights compute.
NEOX_OTHER_KEYS: frozenset[str] = frozenset("""
    account activation_checkpointing adlr_autoresume adlr_autoresume_interval allow_chopped amp
    autotuning autotuning_run base_shapes_file batch_size bf16 char_level_ppl checkpoint
    checkpoint_activations checkpoint_factor checkpoint_in_cpu checkpoint_num_layers
    checkpoint_scale checkpoint_validation_with_forward_pass clip_grad comet_experiment
    comet_experiment_name comet_others comet_project comet_tags comet_workspace comment
    comms_logger communication_data_type compression_training config_files
    contiguous_checkpointing coord_check csv_monitor curriculum_learning curriculum_seqlen
    data_efficiency data_impl data_path data_types dataset_impl deepscale deepscale_config
    deepspeed deepspeed_activation_checkpointing deepspeed_extra_args deepspeed_mpi
    deepspeed_slurm detect_nvlink_pairs distributed_backend do_test do_train do_valid dpo_beta
    dpo_fp32 dpo_reference_free dump_state dynamic_loss_scale elasticity eod_mask_loss
    eval_interval eval_iters eval_results_prefix eval_tasks exclude exit_interval
    extra_save_iters finetune flops_profiler force_multi fp16 fp32_allreduce fp32_reinforce gas
    git_hash global_num_gpus gradient_accumulation_steps gradient_clipping
    gradient_noise_scale_cpu_offload gradient_noise_scale_n_batches gradient_predivide_factor
    hostfile hysteresis include is_pipe_parallel iteration keep_last_n_checkpoints kl_div_beta
    kl_impl kto_beta kto_desirable_weight kto_fp32 kto_undesirable_weight launcher lazy_mpu_init
    load local_rank log_dir log_grad_norm log_grad_pct_zeros log_gradient_noise_scale
    log_interval log_optimizer_states log_param_norm loss_scale loss_scale_window lr
    lr_decay_fraction lr_decay_iters lr_decay_style master_addr master_port maximum_tokens
    memory_profiling memory_profiling_path merge_file min_lr min_scale mmap_warmup
    moe_expert_interval moe_jitter_eps moe_lbl_in_fp32 moe_router_type moe_top_k mup_attn_temp
    mup_embedding_mult mup_init_scale mup_output_temp mup_rp_embedding_mult mup_width_scale
    neg_test_data_paths neg_test_label_data_paths neg_train_data_paths
    neg_train_label_data_paths neg_valid_data_paths neg_valid_label_data_paths no_load_optim
    no_load_rng no_save_optim no_save_rng no_ssh_check num_gpus num_nodes num_samples
    num_workers onnx_safe optimizer optimizer_type override_lr_scheduler pack_impl
    partition_activations peak_theoretical_tflops pipe_partition_method pos_test_data_paths
    pos_test_label_data_paths pos_train_data_paths pos_train_label_data_paths
    pos_valid_data_paths pos_valid_label_data_paths precompute_model_name prescale_gradients
    profile profile_backward profile_step_start profile_step_stop prompt_end rank recompute
    reinforce_leave_one_out return_logits s3_chunk_size s3_path sample_input_file
    sample_output_file save save_base_shapes save_iters scheduler seed sequence_parallel
    short_seq_prob sparse_gradients split steps_per_print synchronize_each_layer temperature
    tensorboard tensorboard_dir test_data_paths test_data_weights test_label_data_paths
    test_reward_data_paths text_gen_type tokenizer_type top_k top_p train_batch_size
    train_data_paths train_data_weights train_epochs train_impl train_iters
    train_label_data_paths train_micro_batch_size_per_gpu train_reward_data_paths
    use_bnb_optimizer use_checkpoint_lr_scheduler use_comet use_shared_fs use_wandb user_script
    valid_data_paths valid_data_weights valid_label_data_paths valid_reward_data_paths
    vocab_file wall_clock_breakdown wandb wandb_group wandb_host wandb_init_all_ranks
    wandb_project wandb_run_name wandb_team warmup weight_by_num_documents weight_decay
    weighted_sampler_alpha world_size z_loss zero_allgather_bucket_size
    zero_allow_untested_optimizer zero_contiguous_gradients zero_optimization
    zero_reduce_bucket_size zero_reduce_scatter zero_stage
""".split())


def _key(key: str) -> str:
    return str(key).replace("-", "_")


def _get(yml: Mapping[str, Any], name: str, default: Any = None) -> Any:
    for key in (name, name.replace("_", "-")):
        if key in yml:
            return yml[key]
    return default


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _attention_types(value: Any) -> list[str]:
    """Layer types of an ``attention-config`` ([[["global"], 24]] or an expanded list of names)."""
    types: list[str] = []
    for entry in value or []:
        if isinstance(entry, str):
            types.append(entry)
        elif isinstance(entry, (list, tuple)) and entry:
            names = entry[0]
            types.extend([names] if isinstance(names, str) else list(names))
        else:
            types.append(repr(entry))
    return types


def check_neox_yml(yml: Mapping[str, Any]) -> None:
    """Refuse a GPT-NeoX yml whose model this GPT-NeoX implementation cannot run.

    ``yml``: the merged yml (keys with dashes or underscores). Raises ``ConfigError`` naming the
    first key (as GPT-NeoX spells it) and its value outside ``NEOX_MODEL_KEYS``' rule; logs keys
    that are in neither table and non-zero dropout.
    """
    def refuse(name: str, value: Any, why: str) -> None:
        raise ConfigError(f"GPT-NeoX config has {name.replace('_', '-')}={value!r}: {why}; this GPT-NeoX "
                          "implementation (HF GPTNeoXForCausalLM layout) cannot read the checkpoint")

    pos_emb = _get(yml, "pos_emb", "learned")
    if pos_emb != "rotary":
        refuse("pos_emb", pos_emb, "only rotary position embeddings are supported"
               + (" (the key is absent: GPT-NeoX's default is 'learned')" if _get(yml, "pos_emb") is None else ""))
    tying = _get(yml, "no_weight_tying")
    if not _truthy(tying):
        refuse("no_weight_tying", tying, "tied input/output embeddings (GPT-NeoX's default when absent); "
               "Pythia models set no-weight-tying: true")
    for name, want in (("norm", "layernorm"), ("activation", "gelu"), ("output_layer_parallelism", "column")):
        value = _get(yml, name, want)
        if value != want:
            refuse(name, value, f"only {want!r} is supported")
    for name in ("gpt_j_tied", "use_qk_layernorm", "use_mup"):
        if _truthy(_get(yml, name, False)):
            refuse(name, _get(yml, name), NEOX_MODEL_KEYS[name][1])
    for name in ("use_bias_in_norms", "use_bias_in_attn_linear", "use_bias_in_mlp"):
        if not _truthy(_get(yml, name, True)):
            refuse(name, _get(yml, name), "layers without biases are not supported")
    for name in ("sliding_window_width", "sparse_attention"):
        if _get(yml, name) is not None:
            refuse(name, _get(yml, name), NEOX_MODEL_KEYS[name][1])
    layers, heads = _get(yml, "num_layers"), _get(yml, "num_attention_heads")
    for name, allowed in (("num_unique_layers", layers), ("num_kv_heads", heads)):
        value = _get(yml, name)
        if value is not None and value != allowed:
            refuse(name, value, NEOX_MODEL_KEYS[name][1])
    experts = _get(yml, "moe_num_experts")
    if experts not in (None, 1):
        refuse("moe_num_experts", experts, "mixture-of-experts layers are not supported")
    soft = _get(yml, "soft_prompt_tuning")
    if soft and (not isinstance(soft, Mapping) or _truthy(soft.get("enabled", False))):
        refuse("soft_prompt_tuning", soft, "soft-prompt embeddings are not supported")
    attention = _get(yml, "attention_config")
    if attention is not None:
        other = sorted(set(_attention_types(attention)) - set(DENSE_ATTENTION_TYPES))
        if other:
            refuse("attention_config", attention, f"layer types {other} are not dense causal attention "
                   f"(supported: {', '.join(DENSE_ATTENTION_TYPES)})")
    for name in ("attention_dropout", "hidden_dropout"):
        value = _get(yml, name)
        if value:
            logger.warning("GPT-NeoX config has %s=%r: dropout is off at inference; pythia-jax has no "
                           "dropout, so training on from this checkpoint does not apply it",
                           name.replace("_", "-"), value)
    unknown = sorted({_key(k) for k in yml} - set(NEOX_MODEL_KEYS) - NEOX_OTHER_KEYS)
    if unknown:
        logger.warning("GPT-NeoX config keys not known to pythia-jax, ignored: %s (check they do not "
                       "change the architecture)", ", ".join(k.replace("_", "-") for k in unknown))
