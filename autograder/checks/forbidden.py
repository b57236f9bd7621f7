"""The shortcuts an exercise may not use, one list per concept, for ``scan.forbid_names``.

Names are bare attribute names: ``"softmax"`` catches ``torch.softmax``, ``F.softmax`` and
``x.softmax`` alike. An exercise forbids the concepts it asks students to build, and every
concept built in an earlier chapter that would do the work for them (an encoder layer forbids
ATTENTION and LAYER_NORM as well as TRANSFORMER_LAYERS).
"""
SOFTMAX = ("softmax", "log_softmax", "Softmax", "LogSoftmax", "_softmax", "_log_softmax")

#: Attention, single- or multi-head: PyTorch's fused kernels and its module.
ATTENTION = ("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
             "MultiheadAttention", "multi_head_attention_forward")

#: For chapters 4-7 (encoder, decoder, whole model). Layer normalisation, and the other
#: normalisation kernels that compute it after a reshape (group norm with one group, instance
#: norm over the features, batch norm on the transposed rows).
LAYER_NORM = ("layer_norm", "LayerNorm", "native_layer_norm", "RMSNorm", "rms_norm",
              "group_norm", "GroupNorm", "native_group_norm", "instance_norm", "InstanceNorm1d",
              "batch_norm", "BatchNorm1d", "native_batch_norm")
TRANSFORMER_LAYERS = ("Transformer", "TransformerEncoder", "TransformerEncoderLayer",
                      "TransformerDecoder", "TransformerDecoderLayer")
