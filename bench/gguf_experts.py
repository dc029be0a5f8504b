"""Run by bench/llama_cpp.py with llama.cpp's own gguf-py on the path: copy a GGUF f32 file with
only its routed-expert tensors (`*_exps.weight`) quantized to Q8_0 or Q4_0, by gguf-py's reference
quantizers, and every other tensor (attention, embeddings, norms, routers, output) left f32.

That is moeshard's `expert_dtype` (routed experts low-bit, the dense part in the compute dtype):
the like-for-like peer, beside llama_model_quantize's defaults (which quantize attention and the
embeddings too).

    python bench/gguf_experts.py SRC.gguf DST.gguf Q4_0
"""
from __future__ import annotations

import sys

import gguf
from gguf import quants


def main(src: str, dst: str, kind: str) -> None:
    qtype = gguf.GGMLQuantizationType[kind]
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue        # written by GGUFWriter itself
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
    out = []
    for t in reader.tensors:
        if t.name.endswith("_exps.weight"):
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise SystemExit(f"{src}: {t.name} is {t.tensor_type.name}, expected F32")
            data = quants.quantize(t.data, qtype)
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
        else:
            data = t.data
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
        out.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in out:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in ("Q8_0", "Q4_0"):
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    main(*sys.argv[1:])
