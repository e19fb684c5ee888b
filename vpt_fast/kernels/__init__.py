"""Triton kernels, one per file with its host launcher."""


def interpreted(module) -> bool:
    """Whether the kernels of `module` run in Triton's CPU interpreter: `triton.jit` decides
    when the module is imported, by TRITON_INTERPRET=1 being set then or not."""
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(value, InterpretedFunction) for value in vars(module).values())
