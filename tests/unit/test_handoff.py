import pytest

from streams.assistant.handoff import (
    Handoff,
    HandoffHistory,
    IntentDecision,
    TenantHandoffRules,
    asks_for_human,
    complaint_marker,
    decide_handoff,
    record_turn,
)

CONFIDENT_REFUND = IntentDecision("refund", 0.93)
UNSURE = IntentDecision("order_status", 0.31)


def decide(text: str, intent: IntentDecision, answered: bool | None = True, **kw) -> Handoff | None:
    return decide_handoff(text=text, intent=intent, answered=answered, **kw)


def queue(text: str, intent: IntentDecision, **kw) -> str:
    handoff = decide(text, intent, **kw)
    assert handoff is not None, f"expected a handoff for {text!r}"
    return handoff.queue


def test_talk_to_human_intent_hands_off_to_the_general_queue():
    handoff = decide("can someone help me", IntentDecision("talk_to_human", 0.9))
    assert handoff is not None
    assert (handoff.reason, handoff.queue) == ("customer_request", "general")


def test_complaints_go_to_the_complaints_queue():
    handoff = decide("你们的服务太差了，我要投诉", IntentDecision("complaint", 0.88))
    assert handoff == Handoff("complaint", "complaints", "intent complaint")


@pytest.mark.parametrize(
    "text",
    [
        "我要人工客服",
        "转人工",
        "人工",
        "人工！！",
        "有真人吗",
        "亲 在吗 找客服",
        "I want to talk to a human",
        "can I speak with a real person?",
        "agent please",
        "Connect me to an agent",
        "live agent",
    ],
)
def test_keywords_asking_for_a_person_override_the_intent(text: str):
    handoff = decide(text, CONFIDENT_REFUND)
    assert handoff is not None and handoff.reason == "customer_request"
    # The queue still follows a confident intent: a refund question goes to billing.
    assert handoff.queue == "billing"


@pytest.mark.parametrize(
    "text",
    [
        "不要转人工，我自己看看",
        "不用人工",
        "人工智能客服能退款吗",
        "I don't want to talk to a human",
        "do you sell human hair wigs",
        "my user agent is broken",
        "退款多久到账",
    ],
)
def test_no_handoff_for_negated_requests_or_unrelated_words(text: str):
    assert asks_for_human(text) is None
    assert decide(text, CONFIDENT_REFUND) is None


@pytest.mark.parametrize(
    "text",
    [
        "I don't want to talk to a human, just tell me the refund time",
        "no need to connect me to an agent, where is my parcel",
        "不要转人工，告诉我退款多久",
        "no need for a person",
        "I don't need a human",
        "no human please",
        "不用转人工",
        "不需要人工",
        "I do not need to speak with a real person, what is the return window?",
        "I'm not asking for a human, just the tracking link",
        "不需要帮我转人工，运费多少",
        "人工就不用了，告诉我运费",
    ],
)
def test_a_declined_person_is_not_handed_off_on_the_talk_to_human_intent(text: str):
    """The intent model reads "talk to a human" and says talk_to_human (0.68 for the first): the
    customer said the opposite, so the negation wins as it does for the keywords."""
    assert decide(text, IntentDecision("talk_to_human", 0.9)) is None
    assert asks_for_human(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "this is not working let me talk to an agent",
        "I do not trust bots connect me to an agent",
        "why don't you connect me to an agent",
        "I did not talk to an agent yet",
        "我不要退款，我要人工客服",
        "要不转人工吧",
    ],
)
def test_a_request_after_a_negation_of_something_else_is_handed_off(text: str):
    """Only a negation that governs wanting or talking to the person refuses one: "not working",
    "do not trust bots", "why don't you…" leave the request standing, for the keyword rule and
    for the talk_to_human intent."""
    for intent in (CONFIDENT_REFUND, IntentDecision("talk_to_human", 0.9)):
        handoff = decide(text, intent)
        assert handoff is not None and handoff.reason == "customer_request", (intent, handoff)


def test_queue_by_intent_and_a_low_confidence_label_is_not_trusted_for_routing():
    assert queue("转人工", IntentDecision("payment_problem", 0.8)) == "billing"
    assert queue("转人工", IntentDecision("invoice", 0.8)) == "billing"
    assert queue("转人工", IntentDecision("shipping_delivery", 0.8)) == "general"
    assert queue("转人工", IntentDecision("refund", 0.2)) == "general"


def test_two_consecutive_low_confidence_turns_hand_off():
    history = HandoffHistory()
    assert decide("asdf ???", UNSURE, answered=None, history=history) is None
    history = record_turn(history, UNSURE, None)
    assert history == HandoffHistory(1)
    handoff = decide("hmm qwerty", UNSURE, answered=None, history=history)
    assert handoff is not None and (handoff.reason, handoff.queue) == ("low_confidence", "general")
    assert "2 unresolved turns" in handoff.detail


def test_two_consecutive_unanswered_turns_hand_off_and_a_mix_counts_too():
    history = record_turn(HandoffHistory(), CONFIDENT_REFUND, answered=False)
    handoff = decide("where is my refund", CONFIDENT_REFUND, answered=False, history=history)
    assert handoff is not None and (handoff.reason, handoff.queue) == ("unanswered", "billing")
    # low confidence, then unanswered: two unresolved turns in a row
    history = record_turn(HandoffHistory(), UNSURE, answered=None)
    assert decide("where is my refund", CONFIDENT_REFUND, answered=False, history=history) is not None


def test_answered_questions_outside_the_shop_taxonomy_never_hand_off():
    # Seen with `make run`: a travel tenant's FAQ answered "how heavy can my bag be" and "能退多少钱"
    # from its documents, but the shop intent model was unsure of both, and the second answer was
    # replaced by a low_confidence handoff. A turn the knowledge base answered is resolved.
    history = HandoffHistory()
    for text in ("How many kg can my checked bag weigh?", "我想取消行程，能退多少钱？", "can I bring my cat"):
        assert decide(text, UNSURE, answered=True, history=history) is None
        history = record_turn(history, UNSURE, answered=True)
    assert history == HandoffHistory(0)


def test_an_answered_confident_turn_resets_the_count():
    history = record_turn(HandoffHistory(), UNSURE, answered=False)
    history = record_turn(history, CONFIDENT_REFUND, answered=True)
    assert history == HandoffHistory(0)
    assert decide("still nothing", CONFIDENT_REFUND, answered=False, history=history) is None


def test_answer_not_known_yet_does_not_count_as_unanswered():
    history = HandoffHistory(1)
    assert decide("where is my refund", CONFIDENT_REFUND, answered=None, history=history) is None
    assert record_turn(history, CONFIDENT_REFUND, answered=None) == HandoffHistory(0)


def test_small_talk_is_never_unanswered():
    greeting = IntentDecision("greeting", 0.95)
    assert decide("在吗", greeting, answered=False, history=HandoffHistory(5)) is None
    assert record_turn(HandoffHistory(1), greeting, answered=False) == HandoffHistory(0)


def test_tenant_rules_always_hand_off_intents_keywords_thresholds_and_queues():
    rules = TenantHandoffRules.from_dict(
        {
            "always_handoff_intents": ["cancel_order"],
            "keywords": ["lawyer", "律师"],
            "low_confidence_threshold": 0.7,
            "max_unresolved_turns": 3,
            "queues": {"cancel_order": "orders", "complaint": "vip-care"},
            "default_queue": "frontline",
        }
    )
    handoff = decide("cancel my order", IntentDecision("cancel_order", 0.9), rules=rules)
    assert handoff == Handoff("tenant_rule", "orders", "intent cancel_order")
    handoff = decide("我要找律师", CONFIDENT_REFUND, rules=rules)
    assert handoff is not None and (handoff.reason, handoff.queue) == ("tenant_rule", "billing")
    handoff = decide("My LAWYER will call", IntentDecision("greeting", 0.9), rules=rules)
    assert handoff is not None and handoff.reason == "tenant_rule" and handoff.queue == "frontline"
    assert queue("bad", IntentDecision("complaint", 0.9), rules=rules) == "vip-care"
    # 0.65 is low for this tenant, and it allows three unresolved turns
    unsure = IntentDecision("refund", 0.65)
    assert decide("x", unsure, answered=False, history=HandoffHistory(1), rules=rules) is None
    assert decide("x", unsure, answered=False, history=HandoffHistory(2), rules=rules) == Handoff(
        "low_confidence", "frontline", "3 unresolved turns in a row"
    )
    with pytest.raises(ValueError, match="unknown keys"):
        TenantHandoffRules.from_dict({"keyword": ["x"]})


@pytest.mark.parametrize(
    ("text", "intent", "want_queue"),
    [
        # The intent model read the topic, not the anger (labels as the shipped cascade gave them).
        ("太气人了，退款申请了一个月还没到账", IntentDecision("refund", 0.79), "billing"),
        ("骗子公司，钱付了东西一直不发", IntentDecision("payment_problem", 0.44), "complaints"),
        ("第三次联系你们了，到底有没有人管？", IntentDecision("talk_to_human", 0.42), "complaints"),
        ("我要找你们经理，这事没完", IntentDecision("complaint", 0.46), "complaints"),
        ("再不处理我就去12315", UNSURE, "complaints"),
        ("垃圾商家", UNSURE, "complaints"),
        (
            "im so done with this store. where is my money",
            IntentDecision("product_question", 0.22),
            "complaints",
        ),
        ("I will dispute the charge with my bank and leave a 1 star review", UNSURE, "complaints"),
        ("you people are useless, I've been waiting for my refund for a month", UNSURE, "complaints"),
        (
            "This is the worst service ever, my order is 3 weeks late",
            IntentDecision("order_status", 0.41),
            "complaints",
        ),
        ("Your company is a scam", UNSURE, "complaints"),
        ("third time I'm writing about the same blender", UNSURE, "complaints"),
        ("nobody answers my emails", UNSURE, "complaints"),
        ("I want to speak to your manager", UNSURE, "complaints"),
        ("my order still hasnt shipped wtf", IntentDecision("order_status", 0.9), "general"),
        # Full-width, traditional and mixed-script forms.
        ("ＷＴＦ where is my order", UNSURE, "complaints"),
        ("你們是騙子", UNSURE, "complaints"),
        ("找你們經理", UNSURE, "complaints"),
        ("wtf怎么还没发货", UNSURE, "complaints"),
        ("我要找manager", UNSURE, "complaints"),
        # Common phrasings a review found missed by the first version.
        ("服务太差了", UNSURE, "complaints"),
        ("态度恶劣", UNSURE, "complaints"),
        ("问了两次都没人回", UNSURE, "complaints"),
        ("这都第三次了还没解决", UNSURE, "complaints"),
        ("Terrible customer service", UNSURE, "complaints"),
        ("I'm so angry", UNSURE, "complaints"),
        ("Nobody has answered my emails", UNSURE, "complaints"),
        ("I've asked three times already", UNSURE, "complaints"),
        ("this is fraud plain and simple. reporting to consumer protection", UNSURE, "complaints"),
        # A negation of another verb, a rhetorical one, traditional Chinese (OpenCC).
        ("Don't make me call my lawyer", UNSURE, "complaints"),
        ("I can't believe nobody has answered my emails", UNSURE, "complaints"),
        ("Why can't I talk to a manager?", UNSURE, "complaints"),
        ("别逼我投诉", UNSURE, "complaints"),
        ("你们不是骗子是什么", UNSURE, "complaints"),
        ("他媽的怎麼還沒到", UNSURE, "complaints"),
        ("服務極差", UNSURE, "complaints"),
    ],
)
def test_an_angry_or_escalating_customer_is_handed_off_whatever_the_intent(
    text: str, intent: IntentDecision, want_queue: str
):
    handoff = decide(text, intent, answered=True)
    assert handoff is not None, f"not handed off: {text!r}"
    assert (handoff.reason, handoff.queue) == ("complaint", want_queue)
    assert handoff.detail.startswith("keyword ")


@pytest.mark.parametrize(
    "text",
    [
        "what's the worst case for delivery time to Canada?",
        "can I save the card in my password manager?",
        "do you sell 垃圾袋 in bulk?",
        "可以用工商银行的卡付款吗",
        "烟雾报警器支持保修吗",
        "收到诈骗短信去哪里举报",
        "how do I report a scam text message",
        "is this email from you a scam?",
        "my card got flagged for fraud on your site",
        "我的客户经理是谁",
        "我的订单还没完成支付",
        "is it a problem if I return shoes without the box?",
        "第一次买，怎么用优惠券",
        # A review's ordinary questions of shop, telecom and SaaS tenants that the first version
        # handed off (a bare 经理, 报警, 垃圾, 骗子, "manager", "chargeback", "fraud", a count...).
        "我们公司的产品经理想开通一个账号",
        "怎么添加主管理员账号",
        "报警规则怎么设置",
        "怎么拦截垃圾电话",
        "有骗子冒充你们客服给我打电话",
        "这是不是骗人的短信",
        "第一次网购怕被坑，有什么保障",
        "如何回复买家的差评",
        "孕妇孕吐恶心可以喝这个茶吗",
        "分期的第二次打款是什么时候",
        "第二次咨询还收费吗",
        "取消订阅后是不是再也不会收到短信了",
        "我找了好几遍也没找到发票下载入口",
        "这个价格离谱地便宜是真的吗",
        "能开律师事务所抬头的发票吗",
        "If no one answers the door, where does the courier leave the package?",
        "How do I add a manager to my team account?",
        "How do I install Google Tag Manager on my store?",
        "Can my supervisor approve purchases over $500?",
        "I have power of attorney for my father, can I manage his account?",
        "How do I respond to a chargeback?",
        "How can I dispute a charge on my phone bill?",
        "What fraud protection do you offer?",
        "I ripped off the tags, can I still return it?",
        "Do you sell shitake mushrooms?",
        "Do you have Fast and Furious on Blu-ray?",
        "Is the hotel a 1 star or 3 star?",
        "This is my 5th time ordering, do I get a loyalty discount?",
        "what's the worst that could ever happen if I cancel?",
        "How do I set it up so I never again have to enter my card?",
        "I'm sick of my old phone, what upgrades are available?",
        # A blind question set's calm questions (shop_holdout4) that the reviewed version still took.
        "I'm a lawyer sending a thank you present to a client, can you add a printed message card",
        "if I return something I paid with Afterpay, do I have to do a chargeback or does it sort itself out?",
        "我是做消费者投诉研究的学生 你们有学生优惠吗",
        # A second review's: everyday words that contain a marker's characters, and calm English.
        "妈妈的生日蛋糕能送到医院吗",
        "景区这几天天气人多吗",
        "什么破损算质量问题",
        "如何报告你们的安全漏洞",
        "第二次催费短信是什么意思",
        "快递员联系了好几次我都没接到，能改派送时间吗",
        "有上门收垃圾服务吗",
        "航班延误可以要求赔偿吗",
        "I've never ordered from you before, is there a first-order discount?",
        "It's a joke gift, can you wrap it?",
        "I get terrible service in my basement, do you sell signal boosters?",
        "How do I block scammer calls?",
        "This is the second time I order from you, is there a loyalty discount?",
        "Can I speak to the manager of the hotel about a late check-in?",
        # Negated.
        "我不是要投诉，只是问一下退款进度",
        "不用找经理，帮我查下订单就行",
        "I don't want to file a complaint, I just want to know where my parcel is",
    ],
)
def test_plain_questions_with_nearby_words_are_not_complaints(text: str):
    assert complaint_marker(text) is None
    assert decide(text, CONFIDENT_REFUND) is None


def test_an_unsure_talk_to_human_or_complaint_label_alone_does_not_hand_off():
    assert decide("hmm", IntentDecision("talk_to_human", 0.3)) is None
    assert decide("hmm", IntentDecision("complaint", 0.3)) is None


def test_pure_and_deterministic():
    first = decide_handoff(text="转人工", intent=CONFIDENT_REFUND, answered=True, history=HandoffHistory(1))
    again = decide_handoff(text="转人工", intent=CONFIDENT_REFUND, answered=True, history=HandoffHistory(1))
    assert first == again


@pytest.mark.parametrize(
    "text",
    [
        # Held-out set 5's missed hand-offs (benchmarks/data/shop_holdout5_questions.jsonl).
        "stop sending me links, i need a human to look at my refund, its been a month",
        "hi, can i speak with someone about a complicated order issue? its hard to explain here",
        "I need a real person",
        "can I talk to someone please",
        # Held-out set 7's (written blind, benchmarks/data/shop_holdout7_questions.jsonl).
        "I'd like a person to help me pick a size, im 5'4 and 130lbs",
        "manager. now.",
        "could I please speak with one of your team? it's a bit complicated to explain",
        "我七十多了 眼睛不好 这些按钮都看不清 能不能叫个人打电话教教我",
        # ...and what a review of those rules found missing.
        "can I get a manager?",
        "请安排人工电话联系我",
        "我要人工电话回访",
        "叫个人过来处理",
    ],
)
def test_needing_a_human_or_speaking_with_someone_asks_for_a_person(text: str):
    handoff = decide(text, CONFIDENT_REFUND)
    assert handoff is not None and handoff.reason == "customer_request", text


@pytest.mark.parametrize(
    "text",
    [
        "骗子！钱扣了订单没有 还我钱！！！",  # 没有 ends the clause before 还我钱: not its negation
        "再不给我退款我就报警了 SO20119384",
        "im done. the replacement was broken TOO. i want someone to call me today or im posting "
        "everywhere about this scam",
    ],
)
def test_held_out_threats_and_charges_of_fraud_hand_off(text: str):
    handoff = decide(text, CONFIDENT_REFUND, answered=True)
    assert handoff is not None, f"not handed off: {text!r}"


@pytest.mark.parametrize(
    "text",
    [
        "I don't need a human, just tell me the refund time",
        "do you sell human hair extensions",
        "can I send the gift to someone else",
        "is there a way to report a scam email pretending to be you",
        "有骗子冒充你们客服怎么办",
        "报警器支持退货吗",
        "订单没有 发货吗",
    ],
)
def test_and_their_look_alikes_do_not(text: str):
    assert decide(text, CONFIDENT_REFUND, answered=True) is None, text


@pytest.mark.parametrize(
    "text",
    [
        # Held-out set 6 (benchmarks/data/shop_holdout6_questions.jsonl, written blind) and others.
        "my daughter got a rash from the bracelet you sold, who do i talk to",
        "用了你们的面霜过敏 脸都肿了 怎么办",
        "账号被盗了 有人用我的余额下了好几单",
        "someone hacked my account and placed orders with my saved card",
        "the delivery driver was really aggressive and threatened me at my door",
        "the charger caught fire last night",
        "我的充电宝冒烟了",
        "the kettle burned my hand",
        "there are 3 orders on my account that i didn't place",
        "快递员骂我还威胁我",
        # ...and what a review found missing.
        "I never placed these orders",
        "I don't recognize these charges",
        "my kid burned his hand on the kettle",
        "鞋子穿了脚都肿了",
        "盗号了怎么找回账号？",
        "my account is compromised",
        # Held-out set 7's (written blind): harm, a takeover, fraud, bereavement, a person in crisis.
        "小孩把耳机上掉下来的小零件吞下去了 现在在医院",
        "我账号被人登了 余额被花光了 手机号都被改了",
        "有人说是你们客服打电话让我转账退款 我已经转了3000 是不是你们的人",
        "最近真的撑不下去了 买个东西都出问题 活着好累",
        "你哋個保溫杯爆咗 熱水淋到我隻手 好痛",
        "got an email from 'your support' asking for my card details and i gave them, was that you??",
        "my husband passed away and im trying to close his account and sort out his orders, i dont know where to start",
        "im in a really bad place rn, this was a gift for my mom's funeral and it's not here",
        "我被骗了2000块",
        # Held-out set 9's (seen before these were written): a near-swallowed part, a courier's
        # threat, a customer at the end of their tether, card details typed into a link.
        "买的儿童水杯 盖子上的小零件掉了 孩子差点吞下去",
        "my toddler nearly swallowed the battery from the remote you sold",
        "快递员送货的时候骂我 还说知道我住哪 我现在都不敢开门",
        "我真的撑不下去了 钱都花光了 这笔退款对我很重要",
        "honestly i don't know what to do anymore, i spent my rent money on this order",
        "got a text from 'your shop', i clicked the link and entered my card details, now there's a $400 charge",
        "点了那个链接输入了银行卡号 现在钱没了",
        # The review's misses (twenty-ninth session): a negation in an earlier clause, variants.
        "I can't believe it, my toddler nearly swallowed the battery from the toy",
        "idk what to do anymore, my refund never came and rent is due",
    ],
)
def test_an_incident_only_a_person_can_take_on_hands_off_whatever_the_question(text: str):
    handoff = decide(text, CONFIDENT_REFUND, answered=True)
    assert handoff is not None and handoff.reason == "incident", (text, handoff)
    assert handoff.queue == "billing"  # the confident intent routes it, as for a request


@pytest.mark.parametrize(
    "text",
    [
        "does the face cream cause allergies?",
        "这个面霜会过敏吗",
        "过敏体质能用吗",
        "how do I keep my account from being hacked",
        "what should i do if someone hacked my account",
        "怎么防止账号被盗",
        "电池会不会爆炸",
        "这个充电器有没有防爆炸",
        "防烫伤手套有吗",
        "不会漏电吧",
        "can you cut me a deal",
        "your prices shocked me",
        "smoke detector in stock?",
        "no allergic reaction so far, love it",
        "i didn't have an allergic reaction",
        "我妈住院 帮她下单送医院可以吗",
        "charged twice but no order confirmation",  # the failed-payment article answers it
        "重复扣款了",
        # A review's look-alikes (twenty-sixth session): hedges and denials inside the match, product
        # names, damaged parcels, a gift, a delivery question, yes/no questions, a rash guard.
        "敏感肌用了会不会过敏",
        "孕妇吃了会不会过敏",
        "小孩喝了容易拉肚子吗",
        "我用了没有过敏，效果很好",
        "爆炸款T恤还有吗",
        "烫伤膏有货吗",
        "漏电保护器什么时候发货",
        "包裹被划伤了",
        "屏幕被砸到了",
        "这件衣服不是我买的，是朋友送的，可以换尺码吗",
        "我住院了，能晚点收货吗",
        "Does this cream cause an allergic reaction?",
        "I'm worried about an allergic reaction",
        "Has my account been compromised?",
        "It melted in the sun, can I get a refund?",
        "Do you have the rash guard in medium?",
        "got burns ointment in stock?",
        "My wife went to the hospital so I missed the delivery, can you redeliver",
        # Look-alikes of set 7's rules: feared, asked, a product, a word inside another.
        "这个保温杯会不会爆",
        "宝宝能吃这个吗 会不会吞下去",
        "怕被骗了 你们官方客服电话是多少",
        "热水壶能烧开水吗",
        "do you sell funeral flowers",
        "I'd like a personalized engraving on the watch",
        "this dress is to die for",
        "have I been scammed? I got an email about a refund",
        "can I speak with your sales team about bulk orders",
        "Is the manager's special still on?",
        # A review's look-alikes of set 7's rules (twenty-seventh session).
        "my phone died so I couldn't answer the courier",
        "my headphones died after two weeks",
        "my phone is going to die, email me the tracking",
        "signed up for the monthly box by mistake, I want to end it",
        "courier left it in a really bad place, out in the rain",
        "the card number i entered at checkout keeps getting declined",
        "耳机炸了 声音全是杂音",
        "这电池撑不下去了 一天要充三次",
        "自杀式降价吗 这么便宜",
        "想死你们了 终于到货",
        "等快递等得想死",
        "女儿很喜欢这个软糖 一口就吞了",
        "炒菜的时候油溅到手了 这个锅是不是不防溅",
        "I'll talk to the team at my office and order next week",
        "可以叫个人帮我签收吗",
        # Look-alikes of set 9's rules.
        "差点忘了下单 还好赶上了",
        "差点吃不上饭 价格太贵了",
        "I almost choked on my coffee when I saw the price",
        "the card number i entered keeps getting declined, I clicked pay twice",
        "这电池撑不下去了 一天要充三次",
        "快递员打电话给我说放门口了",
        "I clicked the link in your email to track my order, it says not found",
        # The second review's (twenty-ninth session): a negation before a comma still governs.
        "No, nobody hacked my account, I just forgot my password",
        "Would I get a refund if, God forbid, the kettle caught fire?",
        "How do I avoid, as much as possible, unauthorized charges on my card?",
        "我快撑不住了，快饿死了，外卖什么时候到",
        # The review's look-alikes of set 9's first rules (twenty-ninth session): each was handed off.
        "快递员一直打我电话 我在上班没接到 能改天送吗",
        "司机打了我电话说明天送 可以放驿站吗",
        "骑手打我手机说找不到地址 怎么改收货地址",
        "外卖骑手吼了我一嗓子说到楼下了 哈哈",
        "下雨天不敢出门 能晚两天送吗",
        "在洗澡不敢开门 快递能放快递柜吗",
        "不敢回家 怕老婆知道我又买了 能不能寄到公司",
        "快递员说他知道我住哪 结果还是送到隔壁小区了 怎么查物流",
        "这个辣酱太辣了 差点呛死 哈哈 再来两瓶有优惠吗",
        "看到运费差点噎住 满多少包邮啊",
        "差点吞了一整块蛋糕 太好吃了 还有货吗",
        "双十一不打折 穷得活不下去了 有没有优惠券",
        "点了链接输入了验证码还是登录不了 怎么重置密码",
        "点开了这个链接填了卡号 付款还是失败",
        "I clicked the link in your email and entered my password but it says the reset link expired",
        "I tapped the link you sent and put in my card details but the payment failed",
        "opened the link from the order confirmation and typed my login, still can't sign in",
        "I can't cope with how cute this dress is, do you have it in M?",
        "I can't go on waiting, just cancel the order",
        "I don't know what to do anymore with this coupon, it keeps saying invalid",
        "the seams, the zip, everything is falling apart after one wash, can I return it?",
        "almost choked on the chips they're that good, when is the restock",
        "my son nearly choked laughing at the gift message",
        "my toddler almost choked on his juice laughing at the toy",
    ],
)
def test_asking_about_harm_or_fearing_it_is_not_an_incident(text: str):
    assert decide(text, CONFIDENT_REFUND, answered=True) is None, text


@pytest.mark.parametrize(
    "text",
    [
        "is there anyone there who can actually help",
        "有没有人能真正帮我解决一下问题啊",
        "i want to order 400 units for my company, can someone from sales contact me",
        "can someone call me back at the number on my account",
        "please call me back",
        "给我回个电话",
        "没有人能帮我吗",
        "Can someone from the delivery company contact me?",
    ],
)
def test_asking_for_someone_to_help_or_call_back_asks_for_a_person(text: str):
    handoff = decide(text, CONFIDENT_REFUND, answered=True)
    assert handoff is not None and handoff.reason == "customer_request", (text, handoff)


@pytest.mark.parametrize(
    "text",
    [
        "please don't call me back, email is fine",
        "no need to call me back",
        "You don't need to call me back",
        "Don't bother to call me back",
        "The courier said he would call me back",
        "Can someone email me a receipt?",
        "快递员打电话给我说放驿站了",
        "你们的人工客服电话是多少",
        "我会拒付吗？",
        "不用给我回电话",
        "can someone else pick up the parcel for me",
        "is there anyone who can sign for it if i'm out",
    ],
)
def test_refusing_a_call_back_or_someone_else_doing_a_thing_does_not(text: str):
    assert decide(text, CONFIDENT_REFUND, answered=True) is None, text


@pytest.mark.parametrize(
    "text",
    [
        "if i dont get my money back today im filing a chargeback with my bank",
        "再不处理我就让信用卡中心拒付",
    ],
)
def test_a_chargeback_threat_without_an_apostrophe_or_in_chinese_is_a_complaint(text: str):
    handoff = decide(text, CONFIDENT_REFUND, answered=True)
    assert handoff is not None and handoff.reason == "complaint", (text, handoff)


def test_asking_when_the_agents_work_is_not_by_its_words_a_request():
    assert asks_for_human("人工客服几点上班？周末有人吗") is None
    assert asks_for_human("你们人工几点下班啊 我晚上十点后才有空 先问问") is None  # set 7
    assert asks_for_human("人工客服") is not None


@pytest.mark.parametrize(
    "text",
    [
        # Held-out sets 2, 4-9: the intent model says talk_to_human (人工客服几点下班: 0.94).
        "人工客服几点下班",
        "人工客服几点上班？周末有人吗",
        "客服电话多少",
        "what time do agents come online on saturday",
        "do u have an email address for support",
        "what are your customer service hours",
        "when is customer service open on sundays",
    ],
)
def test_a_question_about_the_people_the_faq_answers_is_answered(text: str):
    """Asking when the agents work or how to reach them is a question for the contact article,
    not a request for a person: the talk_to_human intent alone does not hand it off when the FAQ
    answers it, and does when the FAQ has nothing."""
    talk = IntentDecision("talk_to_human", 0.94)
    assert decide(text, talk, answered=True) is None
    handoff = decide(text, talk, answered=False)
    assert handoff is not None and handoff.reason == "customer_request"


@pytest.mark.parametrize(
    "text",
    [
        "人工客服 电话打不通 我要人工",
        "I waited hours for support to reply, get me a human",
        "the number of agents you have is a joke, talk to a person now",
        "can I talk to an agent about my order",
        # The review's (twenty-ninth session): a question about the people, then a request.
        "人工客服什么时候能回复我 我等了两天了",
        "人工客服上班了吗 我的退款要人处理一下",
        "人工客服在线时间到了吗 帮我转一下",
        "support phone number please, this needs a human decision",
    ],
)
def test_a_request_for_a_person_near_words_about_support_still_hands_off(text: str):
    assert decide(text, IntentDecision("talk_to_human", 0.94), answered=True) is not None
