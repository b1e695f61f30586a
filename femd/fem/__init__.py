"""FEM interoperability: FEM's documents in, ``femd/v1`` manifests out.

``documents`` decodes FEM's task templates, tool plans and parametric args as
FEM serves them; ``options`` holds what the operator adds (pins, mappings) and
the problems a conversion reports; ``command`` renders FEM command lines as
argv lists; ``parts`` maps a template's parts (tool plan, params, volumes,
outputs, resources, ports), ``render`` one node's argv, environment and
network; ``convert`` puts them together. Runs where the signing happens,
never on a data node.
"""

from femd.fem.convert import Conversion, convert
from femd.fem.documents import (
    FemParams,
    FemTemplate,
    FemToolPlan,
    decode_params,
    decode_template,
    decode_tool_plan,
)
from femd.fem.options import (
    Converted,
    FemImportError,
    FemNode,
    FemOptions,
    Problem,
    manifest_json,
    output_paths,
    parse_dataset,
    parse_duration,
    parse_env,
    parse_memory_mb,
    parse_node,
    parse_port,
)

__all__ = [
    "Conversion",
    "Converted",
    "FemImportError",
    "FemNode",
    "FemOptions",
    "FemParams",
    "FemTemplate",
    "FemToolPlan",
    "Problem",
    "convert",
    "decode_params",
    "decode_template",
    "decode_tool_plan",
    "manifest_json",
    "output_paths",
    "parse_dataset",
    "parse_duration",
    "parse_env",
    "parse_memory_mb",
    "parse_node",
    "parse_port",
]
