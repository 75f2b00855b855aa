"""Built-in adapters: LoRA, textual inversion and IP-Adapter. This module stays light: it names the adapter
classes and the pipeline methods each provides; the adapter modules are imported when a method is first used."""

from diffloom import hookimpl

LORA_METHODS = ["load_lora_weights", "set_adapters", "fuse_lora", "unfuse_lora", "unload_lora_weights",
                "delete_adapters", "get_active_adapters", "get_list_adapters", "enable_lora", "disable_lora",
                "save_lora_weights"]
TEXTUAL_INVERSION_METHODS = ["load_textual_inversion", "unload_textual_inversion"]
IP_ADAPTER_METHODS = ["load_ip_adapter", "set_ip_adapter_scale", "unload_ip_adapter"]


@hookimpl
def register_adapters(register):
    register("lora", f"{__name__}.lora:LoraAdapter", methods=LORA_METHODS)
    register("textual_inversion", f"{__name__}.textual_inversion:TextualInversionAdapter",
             methods=TEXTUAL_INVERSION_METHODS)
    register("ip_adapter", f"{__name__}.ip_adapter:IPAdapter", methods=IP_ADAPTER_METHODS)
