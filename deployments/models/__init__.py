"""The model deployments: the shared dynamic-LoRA deployment (:mod:`.dynamic`), the merged deployments
(:mod:`.merged`), the engine as they see it (:mod:`.engines`) and the LRU of adapters resident in an
engine (:mod:`.adapter_cache`). Each holds a model; none imports anything of the HTTP edge."""
