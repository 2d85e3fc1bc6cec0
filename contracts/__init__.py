"""Wire contracts shared by the API (`handlers`) and the trainer (`trainer`).

Everything here is pure Python + pydantic: importing it must never pull in torch,
transformers or boto. Changing a name in this package changes a public contract.
"""
