"""The official M2-BERT state dict's names and shapes (research/m2.md §2.6), for the
parameter-count and converter tests."""


def official_shapes(H, I, layers, V=30528, L=128, order=128, E=5, legacy=False, nb=4,
                    positions=True):
    """{official state-dict name: shape} of an M2-BERT MLM model (research/m2.md §2.6),
    buffers and the five aliased Sin frequencies included; `positions=False` is
    `use_positional_encodings: False` (no position table)."""
    s = {"bert.embeddings.word_embeddings.weight": (V, H),
         "bert.embeddings.token_type_embeddings.weight": (2, H),
         "bert.embeddings.LayerNorm.weight": (H,), "bert.embeddings.LayerNorm.bias": (H,),
         "bert.embeddings.position_ids": (1, L),
         "cls.predictions.transform.dense.weight": (H, H),
         "cls.predictions.transform.dense.bias": (H,),
         "cls.predictions.transform.LayerNorm.weight": (H,),
         "cls.predictions.transform.LayerNorm.bias": (H,),
         "cls.predictions.decoder.weight": (V, H), "cls.predictions.decoder.bias": (V,)}
    if positions:
        s["bert.embeddings.position_embeddings.weight"] = (L, H)
    for i in range(layers):
        a, m = f"bert.encoder.layer.{i}.attention", f"bert.encoder.layer.{i}.mlp"
        s.update({f"{a}.in_linear.weight": (3 * H, H), f"{a}.in_linear.bias": (3 * H,),
                  f"{a}.out_linear.weight": (H, H), f"{a}.out_linear.bias": (H,),
                  f"{a}.short_filter.weight": (3 * H, 1, 3), f"{a}.short_filter.bias": (3 * H,),
                  f"{m}.gated_layers.weight": (nb, 2 * I // nb, H // nb),
                  f"{m}.wo.weight": (nb, H // nb, I // nb), f"{m}.wo.bias": (H,),
                  f"{m}.layernorm.weight": (H,), f"{m}.layernorm.bias": (H,)})
        if legacy:
            s.update({f"{a}.layernorm.weight": (H,), f"{a}.layernorm.bias": (H,)})
        for fn in ("filter_fn", "filter_fn2"):
            f = f"{a}.{fn}"
            s.update({f"{f}.bias": (H,), f"{f}.pos_emb.z": (1, L, E), f"{f}.pos_emb.t": (1, L, 1),
                      f"{f}.modulation.deltas": (1, 1, H)})
            for mlp in ("implicit_filter", "implicit_filter_rev"):
                s.update({f"{f}.{mlp}.0.weight": (order, E), f"{f}.{mlp}.0.bias": (order,),
                          f"{f}.{mlp}.2.weight": (order, order), f"{f}.{mlp}.2.bias": (order,),
                          f"{f}.{mlp}.4.weight": (order, order), f"{f}.{mlp}.4.bias": (order,),
                          f"{f}.{mlp}.6.weight": (H, order)})
                s.update({f"{f}.{mlp}.{k}.freq": (1, order) for k in (1, 3, 5)})
    return s
