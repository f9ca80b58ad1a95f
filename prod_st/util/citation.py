"""PROD's BibTeX, cited by the loss module (sentence-transformers' `citation`) and the model card."""

PROD_BIBTEX = """@inproceedings{lin2023prod,
  title={PROD: Progressive Distillation for Dense Retrieval},
  author={Lin, Zhenghao and Gong, Yeyun and Liu, Xiao and Zhang, Hang and Lin, Chen and Dong, Anlei and Jiao, Jian and Lu, Jingwen and Jiang, Daxin and Majumder, Rangan and Duan, Nan},
  booktitle={Proceedings of the ACM Web Conference 2023},
  year={2023},
  eprint={2209.13335}
}"""
