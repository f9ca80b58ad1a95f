"""The embedded recipes (YAML), shipped inside the wheel as `prod_st.recipes`; `prod-st run NAME` finds them."""
