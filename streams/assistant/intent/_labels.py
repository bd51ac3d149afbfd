"""The default shop taxonomy. Sorted, so it matches scikit-learn's class order."""

LABELS: tuple[str, ...] = (
    "account_login",
    "cancel_order",
    "change_address",
    "complaint",
    "discount_coupon",
    "greeting",
    "invoice",
    "order_status",
    "out_of_scope",
    "payment_problem",
    "product_question",
    "refund",
    "return_exchange",
    "shipping_delivery",
    "talk_to_human",
    "thanks_goodbye",
)
assert list(LABELS) == sorted(LABELS)
