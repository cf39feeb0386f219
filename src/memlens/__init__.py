from memlens.errors import MemlensError, InputError
